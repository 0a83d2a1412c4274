"""The `tensorrt` backend: an engine folder behind the same `DecoderSession` as every other backend.

Thin on purpose, in the manner of TensorRT-LLM's generic engine session (`tensorrt_llm/runtime/session.py`): an
`EngineSession` knows nothing about FUSION; it sets named input shapes, binds named torch CUDA tensors by address
and enqueues the engine on a stream (`IExecutionContext.set_input_shape`, `set_tensor_address`,
`execute_async_v3(stream_handle)`; TensorRT's NvInferRuntime.h: addresses 256-byte aligned, which torch's
allocator guarantees, and never the default stream). Model knowledge stays in `TrtSession`, which prepares inputs
with `fusion_export.graph_inputs` exactly as ONNX Runtime does:
- engines deserialized once per backend, one execution context each: the vision encoder's, and the decoder's, one
  engine for prefill and decode (its one profile spans both: a prefill binds the prompt as `seq` new tokens at
  column 0, a step binds no latents, engines/feeds.py); `--plugins on` folders keep a prefill and a step engine;
- the KV cache preallocated at the engines' fixed capacity, one torch tensor per layer bound as both `past_*`
  input and `present_*` output (TensorRT's KV-cache update writes in place; `ICudaEngine.get_aliased_input_tensor`);
- the decode step captured in a CUDA graph after one eager run, as trtexec's --useCudaGraph does
  (sampleInference.cpp: "execute the enqueue function at least once before starting CUDA graph capture"),
  replayed with new inputs copied into the captured buffers; if capture is refused, steps run eagerly.

Everything that needs no GPU (folder and TensorRT checks, request limits, input preparation) runs on open or
session creation and is tested on CPU machines; what needs one is what TensorRT itself executes.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fusion_export.graph_inputs import LOGITS, VISION_OUTPUTS, past_names, present_names
from fusion_export.precision import Precision
from reference_model.errors import FusionError
from reference_model.generation import DecodeState, GenerationError, StageClock, require_finite
from reference_model.input_files import read_tensor
from reference_model.model import VisionOutputs
from reference_model.sequence import PreparedBatch

from ..feeds import (
    cache_as_float,
    decoder_prefill_inputs,
    decoder_step_inputs,
    prefill_inputs,
    step_inputs,
    vision_inputs,
)
from ..plugins.kernel_table import LOCAL_FUNCTION
from ..plugins.tensorrt_plugins import register_plugins
from .engine_manifest import EngineError, EngineFolder, check_runtime, open_engines
from .flavours import Trt, TrtFlavour, load_trt
from .plan import DECODER

_TORCH_DTYPES = {"FLOAT": torch.float32, "HALF": torch.float16, "BF16": torch.bfloat16, "INT64": torch.int64,
                 "INT32": torch.int32, "BOOL": torch.bool, "INT8": torch.int8}  # fmt: skip


def check_request(limits: dict[str, int], batch: PreparedBatch, max_new_tokens: int) -> None:
    """A request must fit the engines' optimization profiles and KV capacity; the limit is named on refusal."""
    layout = batch.layout
    checks = [
        ("batch size", layout.batch_size, limits["max_batch"], "--max-batch"),
        ("question", batch.instructs.shape[1], limits["max_question_tokens"], "--max-question-tokens"),
        ("prompt", layout.seq_len, limits["max_prompt"], "--max-prompt"),
    ]
    for what, value, limit, flag in checks:
        if value > limit:
            raise GenerationError(
                f"the request's {what} is {value}; these engines take at most {limit} (rebuild with a larger {flag})"
            )
    needed, capacity = layout.seq_len + max_new_tokens, limits["max_context"]
    if needed > capacity:
        raise GenerationError(
            f"the request needs {needed} KV-cache columns (prompt {layout.seq_len} + max_new_tokens "
            f"{max_new_tokens}); these engines hold {capacity}; use fewer new tokens or rebuild with a larger "
            "--max-context"
        )


class EngineSession:
    """One deserialized engine and its execution context: named torch CUDA tensors in and out."""

    def __init__(self, trt: Trt, plan: bytes, path: Path):
        self.path = path
        runtime = trt.module.Runtime(trt.logger())
        self.engine = runtime.deserialize_cuda_engine(plan)
        if self.engine is None:
            messages = "; ".join(trt.logger().errors()[-3:])
            raise EngineError(f"{path}: {trt.describe()} could not deserialize it ({messages})")
        self.context = self.engine.create_execution_context()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        mode = trt.module.TensorIOMode.INPUT
        self.inputs = [n for n in names if self.engine.get_tensor_mode(n) == mode]
        self.outputs = [n for n in names if self.engine.get_tensor_mode(n) != mode]
        self.dtypes = {n: _TORCH_DTYPES[self.engine.get_tensor_dtype(n).name] for n in names}
        self.empty: torch.Tensor | None = None  # an address for empty inputs (a decode step's latents)

    def set_inputs(self, tensors: dict[str, torch.Tensor]) -> None:
        for name, tensor in tensors.items():
            if not self.context.set_input_shape(name, tuple(tensor.shape)):
                raise GenerationError(f"{self.path}: input {name} of shape {list(tensor.shape)} is outside the profile")
            address = tensor.data_ptr()
            if tensor.numel() == 0:  # torch gives an empty tensor no address: bind a real, aligned one, never read
                if self.empty is None:
                    self.empty = torch.zeros(256, dtype=torch.uint8, device=tensor.device)
                address = self.empty.data_ptr()
            self.context.set_tensor_address(name, address)

    def output_shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.context.get_tensor_shape(name))

    def bind_outputs(self, tensors: dict[str, torch.Tensor]) -> None:
        for name, tensor in tensors.items():
            self.context.set_tensor_address(name, tensor.data_ptr())

    def execute(self, stream: torch.cuda.Stream) -> None:
        if not self.context.execute_async_v3(stream.cuda_stream):
            raise GenerationError(f"{self.path}: TensorRT refused to enqueue the engine")


class TrtModel:
    """An engine folder (the `tensorrt` backend). Opening checks the folder; the engines are deserialized on the
    GPU by the first session."""

    kind = "tensorrt"

    def __init__(self, engines: EngineFolder, device: str | None = None):
        self.engines = engines
        self.config = engines.config
        self.model_dir = engines.model_dir
        self.precision = Precision(engines.manifest["precision"])
        # the decoder's engines for a prefill and a step: one engine for both, or two (`--plugins on` folders)
        one = DECODER in engines.engine_names
        self.prefill_engine, self.step_engine = (DECODER, DECODER) if one else ("decoder_prefill", "decoder_step")
        self.quantization = engines.manifest.get("quantization")
        scales = engines.manifest.get("kv_int8_scales")  # an INT8 KV cache's (key, value) scales per layer
        self.kv_int8_scales = None if scales is None else [(float(k), float(v)) for k, v in scales]
        self.attends_to_valid_columns = False  # the engines attend over the whole buffer under a mask
        self.query_len = int(engines.manifest["query_len"])
        self.limits = engines.limits
        self.max_context = self.limits["max_context"]
        self.device_name = device or "cuda:0"
        self._loaded = False

    def describe(self) -> str:
        built = self.engines.manifest["tensorrt"]
        return f"tensorrt ({built['flavour']} {built['version']}), {self.precision} engines from {self.engines.folder}"

    def load(self) -> TrtModel:
        if self._loaded:
            return self
        if not torch.cuda.is_available():
            raise FusionError(
                f"{self.engines.folder}: TensorRT engines run on an NVIDIA GPU and this machine has none "
                "(the builder runs without one; validating the graphs on CPU: fusion-export validate ART)"
            )
        self.device = torch.device(self.device_name)
        flavour = TrtFlavour(self.engines.manifest["tensorrt"]["flavour"])
        self.trt = load_trt(flavour)
        check_runtime(self.engines, self.trt)
        self._check_gpu()
        plugins = self.engines.manifest.get("plugin_implementation", {})
        if any(not how.startswith(LOCAL_FUNCTION) for how in plugins.values()):
            register_plugins(self.trt, plugins)  # the plugin creators must be registered before deserializing
        self.sessions: dict[str, EngineSession] = {}
        with torch.cuda.device(self.device):
            for name in self.engines.engine_names:
                path = self.engines.engine_path(name)
                plan = path.read_bytes()
                verdict = self.trt.engine_validity(plan)
                if verdict is not None and verdict[0] == "INVALID":
                    raise EngineError(f"{path}: invalid on this GPU ({', '.join(verdict[1]) or 'no diagnostics'}); "
                                      f"{self.engines.rebuild_hint()}")  # fmt: skip
                if verdict is not None and verdict[0] == "SUBOPTIMAL":
                    warnings.warn(f"{path}: runs, but was not built for this GPU ({verdict[1]})", stacklevel=2)
                self.sessions[name] = EngineSession(self.trt, plan, path)
            self.stream = torch.cuda.Stream(self.device)
        entry = self.engines.manifest["embeddings"]
        # a regular file; a corrupt header or a missing tensor is named, not a traceback
        self.embed_table = read_tensor(self.engines.folder / entry["file"], entry["tensor"], framework="np")
        self._loaded = True
        return self

    def _check_gpu(self) -> None:
        major, minor = torch.cuda.get_device_capability(self.device)
        target = f"SM{major}{minor}"
        built_for = self.engines.manifest["tensorrt"]["compute_capabilities"]
        if isinstance(built_for, list) and target not in built_for:
            raise EngineError(
                f"{self.engines.folder}: built for {', '.join(built_for)}, this GPU is {target}; "
                f"{self.engines.rebuild_hint()}"
            )

    def session(self, batch: PreparedBatch, max_new_tokens: int) -> TrtSession:
        check_request(self.limits, batch, max_new_tokens)  # before any GPU work
        return TrtSession(self.load(), batch, max_new_tokens)


class TrtSession:
    """One batch on the TensorRT engines (DecoderSession)."""

    def __init__(self, model: TrtModel, batch: PreparedBatch, max_new_tokens: int, cuda_graph: bool = True):
        if batch.query_len != model.query_len:
            raise GenerationError(f"the engines were built for query_len {model.query_len}, not {batch.query_len}")
        d = model.config.decoder
        self.model, self.batch, self.device = model, batch, model.device
        self.batch_size = batch.layout.batch_size
        self.state = DecodeState(batch.layout, max_new_tokens, d.rope.max_position_embeddings, model.max_context)
        dtype = model.sessions[model.step_engine].dtypes["past_key_values.0.key"]
        shape = (self.batch_size, d.num_kv_heads, self.state.capacity, d.head_dim)
        self.cache = [torch.zeros(shape, dtype=dtype, device=self.device) for _ in range(2 * d.num_layers)]
        self.kv = {
            **dict(zip(past_names(d.num_layers), self.cache)),
            **dict(zip(present_names(d.num_layers), self.cache)),
        }
        self.vision: VisionOutputs | None = None
        self.use_cuda_graph, self.graph, self.graph_inputs = cuda_graph, None, None
        self.steps_run = 0

    def _device(self, arrays: dict[str, np.ndarray], session: EngineSession) -> dict[str, torch.Tensor]:
        return {
            name: torch.from_numpy(np.ascontiguousarray(a)).to(self.device, session.dtypes[name], non_blocking=True)
            for name, a in arrays.items()
        }

    def _run(self, name: str, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        session = self.model.sessions[name]
        session.set_inputs({**inputs, **{k: v for k, v in self.kv.items() if k in session.inputs}})
        outputs = {
            out: torch.empty(session.output_shape(out), dtype=session.dtypes[out], device=self.device)
            for out in session.outputs
            if out not in self.kv
        }
        session.bind_outputs({**outputs, **{k: v for k, v in self.kv.items() if k in session.outputs}})
        session.execute(self.model.stream)
        return outputs

    def synchronize(self) -> None:
        self.model.stream.synchronize()

    def prefill(self) -> torch.Tensor:
        model = self.model
        rope = model.config.decoder.rope
        clock = StageClock(self.synchronize)
        with torch.cuda.stream(model.stream):
            vision_session = model.sessions["vision_encoder"]
            vision = self._run(
                "vision_encoder", self._device(vision_inputs(self.batch, model.embed_table), vision_session)
            )
            clock.lap("vision_encoder")
            host = [vision[name].float().cpu().numpy() for name in VISION_OUTPUTS]
            self.vision = VisionOutputs(*(torch.from_numpy(x) for x in host))
            require_finite("vision encoder", **vars(self.vision))
            arrays = prefill_inputs(self.batch, model.embed_table, *host, rope)
            if model.prefill_engine == DECODER:
                arrays = decoder_prefill_inputs(arrays, self.state.capacity)
            engine = model.prefill_engine
            prefill = self._run(engine, self._device(arrays, model.sessions[engine]))
            logits = prefill[LOGITS].float().cpu()
            clock.lap("decoder_prefill")
            self.stage_seconds = clock.seconds
        require_finite("decoder prefill", logits=logits)
        return logits

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        model = self.model
        arrays = step_inputs(tokens, self.state, model.embed_table, model.config.decoder.rope)
        if model.step_engine == DECODER:
            arrays = decoder_step_inputs(arrays, model.config.decoder.hidden_size, model.embed_table.dtype)
        session = model.sessions[model.step_engine]
        with torch.cuda.stream(model.stream):
            if self.graph is not None:  # replay: new values into the captured buffers, then the graph
                for name, array in arrays.items():
                    self.graph_inputs[name].copy_(torch.from_numpy(array), non_blocking=True)
                self.graph.replay()
                logits = self.graph_outputs[LOGITS]
            else:
                inputs = self._device(arrays, session)
                outputs = self._run(model.step_engine, inputs)
                logits = outputs[LOGITS]
                self.steps_run += 1
                if self.use_cuda_graph and self.steps_run == 1:
                    self._capture(inputs, outputs)
            logits = logits.float().cpu()
        require_finite("decoder step", logits=logits)
        return logits

    def _capture(self, inputs: dict[str, torch.Tensor], outputs: dict[str, torch.Tensor]) -> None:
        """Capture the step (shapes and addresses now fixed) in a CUDA graph; fall back to eager steps if the
        engine holds operations a capture does not permit (enqueue returns False, or the capture fails)."""
        self.model.stream.synchronize()
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph, stream=self.model.stream):
                self.model.sessions[self.model.step_engine].execute(self.model.stream)
        except (RuntimeError, GenerationError) as e:
            self.use_cuda_graph = False
            warnings.warn(f"decode step not captured in a CUDA graph ({e}); running it eagerly", stacklevel=2)
            return
        self.graph, self.graph_inputs, self.graph_outputs = graph, inputs, outputs

    def cache_arrays(self) -> list[np.ndarray]:
        self.synchronize()
        return cache_as_float([t.float().cpu().numpy() for t in self.cache], self.model.kv_int8_scales)


def open_backend(path: Path, options: Any) -> TrtModel:
    """The `tensorrt` backend over an engine folder (engines/backends.py)."""
    return TrtModel(open_engines(path), device=options.device)
