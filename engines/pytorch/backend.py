"""The `torch` backend: a checkpoint folder run fast by PyTorch itself, the path for GPUs TensorRT does not serve.

Where the reference allocates a cache per request and recomputes everything on the host, this backend keeps a
fixed-capacity KV cache per batch size on the device (`--max-context`, default the checkpoint's context) updated
in place, runs the prefill eagerly (SDPA, the interaction layers included) and each decode step as one
`DecodeStep` over device-side inputs, captured once into a CUDA graph and replayed on a GPU. The plugin kernels
(engines/plugins, Triton) replace their reference ops where they are the same op: decode attention over each row's
valid columns, the interaction layers' window attention and the window max pooling (`kernels`). On the CPU the
same code runs eagerly (kernels off: Triton kernels run there only in its interpreter), which is how its logic is
tested against the reference.
"""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from reference_model import load_config
from reference_model.errors import FusionError
from reference_model.sequence import PreparedBatch

from .decode_step import StepAttention
from .session import StaticBatch, TorchSession

SWITCHES = ("auto", "on", "off")
KERNEL_DTYPES = ("fp32", "fp16")  # the Triton kernels' float types


@dataclass(frozen=True)
class TorchSettings:
    """How the backend runs, resolved from its options once, before any weight is read."""

    dtype: str
    device: torch.device
    max_context: int  # the static KV cache's columns
    kernels: bool  # the Triton kernels in place of their reference ops
    graph: bool  # the decode step captured into a CUDA graph
    compiled: bool  # the decode step through torch.compile
    attention: StepAttention  # the step's: the kernel, else SDPA over fixed shapes (graph, compile) or the valid slice


def _switch(value: str | None, flag: str) -> str:
    value = value or "auto"
    if value not in SWITCHES:
        raise FusionError(f"{flag} {value}: choose from {', '.join(SWITCHES)}")
    return value


def resolve_settings(config, dtype: str = "fp32", device: str | torch.device = "cpu", max_context: int | None = None,
                     kernels: str | None = None, cuda_graph: str | None = None,
                     compiled: bool = False) -> TorchSettings:  # fmt: skip
    """The options checked against the config and the machine, each refusal naming its flag."""
    from reference_model.checkpoint import resolve_device

    device = resolve_device(str(device))
    positions = config.decoder.rope.max_position_embeddings
    max_context = config.default_context if max_context is None else max_context
    if not 1 <= max_context <= positions:
        raise FusionError(f"--max-context {max_context}: the model has {positions} positions")
    cuda = device.type == "cuda"
    kernels, cuda_graph = _switch(kernels, "--torch-kernels"), _switch(cuda_graph, "--cuda-graph")
    have_triton = importlib.util.find_spec("triton") is not None
    if kernels == "on":
        if dtype not in KERNEL_DTYPES:
            raise FusionError(f"--torch-kernels on: the Triton kernels compute in {' or '.join(KERNEL_DTYPES)}, not "
                              f"{dtype} (--dtype)")  # fmt: skip
        if not have_triton:
            raise FusionError("--torch-kernels on needs Triton: pip install 'fusion-export[plugins]'")
        if not cuda and os.environ.get("TRITON_INTERPRET") != "1":
            raise FusionError(f"--torch-kernels on: Triton kernels run on CUDA devices, not {device}, except in "
                              "Triton's interpreter (TRITON_INTERPRET=1, for tests)")  # fmt: skip
    if cuda_graph == "on" and not cuda:
        raise FusionError(f"--cuda-graph on needs a CUDA device (--device), not {device}")
    use_kernels = kernels == "on" or (kernels == "auto" and cuda and dtype in KERNEL_DTYPES and have_triton)
    use_graph = cuda_graph == "on" or (cuda_graph == "auto" and cuda)
    if use_kernels:
        attention = StepAttention.kernel
    else:  # a graph or a compiled step needs shapes fixed by the capacity
        attention = StepAttention.masked if use_graph or compiled else StepAttention.valid
    return TorchSettings(dtype, device, max_context, use_kernels, use_graph, compiled, attention)


class TorchRunner:
    """A loaded model run by these settings: the static batch of the last batch size, and sessions over it."""

    def __init__(self, model, settings: TorchSettings):
        self.model, self.settings = model, settings
        self._static: StaticBatch | None = None

    def static_batch(self, batch: int) -> StaticBatch:
        """The cache, inputs and (captured) step of this batch size, made on first use; one batch size is held at a
        time, so a new one frees the last one's cache first."""
        s = self.settings
        if self._static is None or self._static.batch != batch:
            self._static = None
            if s.device.type == "cuda":
                torch.cuda.empty_cache()
            self._static = StaticBatch(self.model, batch, s.max_context, s.attention, s.graph, s.compiled)
        return self._static

    def session(self, batch: PreparedBatch, max_new_tokens: int, state=None) -> TorchSession:
        """state: the request's DecodeState when the caller placed it already (decode_state)."""
        state = state or decode_state(self.model.config, self.settings, batch, max_new_tokens)
        static = self.static_batch(batch.layout.batch_size)
        return TorchSession(self.model, static, batch, state, self.settings.kernels)


def decode_state(config, settings: TorchSettings, batch: PreparedBatch, max_new_tokens: int):
    """The request placed in the static cache, refused (naming --max-context) when it does not fit."""
    from reference_model.generation import DecodeState

    positions = config.decoder.rope.max_position_embeddings
    return DecodeState(batch.layout, max_new_tokens, positions, settings.max_context,
                       "the torch backend's KV cache holds {capacity} (--max-context)")  # fmt: skip


class TorchBackend:
    kind = "torch"
    query_len = None  # any: the prefill is eager
    quantization = None
    kv_int8_scales = None

    def __init__(self, model_dir: Path, options) -> None:
        from fusion_export.precision import Precision

        self.model_dir = model_dir
        self.config = load_config(model_dir)
        self.settings = resolve_settings(self.config, options.dtype or "fp32", options.device or "cpu",
                                         options.max_context, options.kernels, options.cuda_graph,
                                         bool(options.compiled))  # fmt: skip
        self.dtype, self.device, self.max_context = self.settings.dtype, self.settings.device, self.settings.max_context
        self.attends_to_valid_columns = self.settings.attention is not StepAttention.masked
        self.precision = Precision(self.dtype) if self.dtype in ("fp32", "fp16") else None
        self._runner: TorchRunner | None = None

    @property
    def runner(self) -> TorchRunner:
        if self._runner is None:
            from reference_model import load_model

            self._runner = TorchRunner(load_model(self.model_dir, dtype=self.dtype, device=self.device), self.settings)
        return self._runner

    @property
    def model(self):
        return self.runner.model

    def load(self) -> TorchBackend:
        self.runner  # noqa: B018  (reads the weights)
        return self

    def describe(self) -> str:
        s = self.settings
        parts = [f"KV capacity {s.max_context}", f"attention: {s.attention}"]
        parts += ["CUDA graph"] * s.graph + ["Triton kernels"] * s.kernels + ["torch.compile"] * s.compiled
        return f"torch (PyTorch {s.dtype} on {s.device}; {', '.join(parts)}) from {self.model_dir}"

    def session(self, batch: PreparedBatch, max_new_tokens: int) -> TorchSession:
        state = decode_state(self.config, self.settings, batch, max_new_tokens)  # before the weights are read
        return self.runner.session(batch, max_new_tokens, state)

    def follow_up(self, turn, chunks: list[list[int]], max_new_tokens: int):
        """A conversation's later turn on top of `turn`: the reference's eager path on this backend's weights."""
        from reference_model.conversation import ReferenceFollowUp

        return ReferenceFollowUp(self.model, turn, chunks, max_new_tokens)


def open_backend(path: Path, options) -> TorchBackend:
    return TorchBackend(path, options)
