"""The `tensorrt` backend: an engine folder behind the same `DecoderSession` as every other backend.

Model knowledge lives here; the engines are driven through `EngineSession` (engine_session.py), which knows nothing
about FUSION. Inputs are prepared with `fusion_export.graph_inputs` exactly as for ONNX Runtime. What each step
follows in TensorRT's documentation is quoted in docs/tensorrt.md section 7.1:
- engines deserialized once per backend from memory-mapped plans, one execution context each: the vision encoder's,
  and the decoder's, one engine for prefill and decode (its one profile spans both: a prefill binds the prompt as
  `seq` new tokens at column 0, a step binds no latents, engines/feeds.py); `--plugins on` folders keep a prefill
  and a step engine; their plugin creators registered before deserializing, whatever the parser needed at build;
- one scratch block shared by the contexts (USER_MANAGED; they run one at a time on one stream), sized by the same
  rule the build planner counts by (device_memory.shared_scratch_bytes);
- the KV cache preallocated at the engines' fixed capacity on the engines' stream (so its zero-fill is ordered
  before their first read): one buffer per cache tensor where the engine aliases `present` to `past` (TensorRT's
  KV-cache update layer, `ICudaEngine.get_aliased_input_tensor`), two that take turns otherwise (kv_buffers.py);
- the decode step captured in a CUDA graph after one eager run of the same bindings, as trtexec's --useCudaGraph
  does (sampleInference.cpp: "execute the enqueue function at least once before starting CUDA graph capture";
  capture mode thread-local, as there), one graph per set of KV bindings (two where buffers take turns), replayed
  with new inputs copied into the captured buffers; where TensorRT says a context cannot be captured
  (`is_stream_capturable`, TensorRT-RTX) or the capture fails, steps run eagerly.
- a conversation's later turn (`TrtFollowUp`): the kept KV columns copied into a new session's buffers, each chunk
  run through the decoder engine as a prefill written after them (engines/feeds.py `follow_up_feeds`).

Everything that needs no GPU (folder and TensorRT checks, request limits, input preparation, KV bindings) runs on
open or session creation and is tested on CPU machines; what needs one is what TensorRT itself executes.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fusion_export.graph_inputs import LOGITS, VISION_OUTPUTS, past_names, present_names
from fusion_export.plugin_ops.onnx_forms import DECODE_ATTENTION
from fusion_export.precision import Precision
from reference_model.conversation import TurnState, chunk_layouts, resumed_state
from reference_model.errors import FusionError
from reference_model.generation import DecodeState, GenerationError, StageClock, require_finite
from reference_model.input_files import read_tensor
from reference_model.model import VisionOutputs
from reference_model.sequence import PreparedBatch

from ..feeds import (
    cache_as_float,
    decoder_prefill_inputs,
    decoder_step_inputs,
    follow_up_feeds,
    prefill_inputs,
    refuse_several_turns,
    step_inputs,
    vision_inputs,
)
from ..plugins.kernel_table import LOCAL_FUNCTION
from ..plugins.tensorrt_plugins import register_plugins
from .engine_manifest import EngineError, EngineFolder, check_runtime, open_engines
from .engine_session import EngineSession, read_plan, share_scratch
from .flavours import TrtFlavour, load_trt
from .kv_buffers import KvBuffers
from .plan import DECODER


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


class TrtModel:
    """An engine folder (the `tensorrt` backend). Opening checks the folder; the engines are deserialized on the
    GPU by the first session."""

    kind = "tensorrt"

    def __init__(self, engines: EngineFolder, device: str | None = None):
        self.engines = engines
        manifest = engines.manifest
        self.config = engines.config
        self.model_dir = engines.model_dir
        self.precision = Precision(manifest["precision"])
        # the decoder's engines for a prefill and a step: one engine for both, or two (`--plugins on` folders)
        one = DECODER in engines.engine_names
        self.prefill_engine, self.step_engine = (DECODER, DECODER) if one else ("decoder_prefill", "decoder_step")
        self.quantization = manifest.get("quantization")
        scales = manifest.get("kv_int8_scales")  # an INT8 KV cache's (key, value) scales per layer
        self.kv_int8_scales = None if scales is None else [(float(k), float(v)) for k, v in scales]
        # a step engine running DecodeAttention as a plugin reads only each row's written columns; otherwise its
        # attention reads the whole buffer under a mask (what the bench's roofline counts)
        step_plugins = manifest["engines"][self.step_engine].get("plugin_layers", {})
        self.attends_to_valid_columns = step_plugins.get(DECODE_ATTENTION, 0) > 0
        # the weights a decode step reads as stored, counted by the build plan from the graphs (engine folders
        # carry no graphs to count them from)
        self.step_weight_bytes = manifest["plan"].get("decoder_weights") or None
        self.query_len = int(manifest["query_len"])
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
        self._register_plugins()
        self.sessions: dict[str, EngineSession] = {}
        with torch.cuda.device(self.device):
            for name in self.engines.engine_names:
                path = self.engines.engine_path(name)
                runtime, engine = read_plan(self.trt, path, self.engines.rebuild_hint())
                self.sessions[name] = EngineSession(self.trt, runtime, engine, path)
            self.stream = torch.cuda.Stream(self.device)
            with torch.cuda.stream(self.stream):
                device = self.device
                allocate = lambda n: torch.empty(n, dtype=torch.uint8, device=device)  # noqa: E731
                self.scratch = share_scratch(self.sessions.values(), allocate)
        entry = self.engines.manifest["embeddings"]
        # a regular file; a corrupt header or a missing tensor is named, not a traceback
        self.embed_table = read_tensor(self.engines.folder / entry["file"], entry["tensor"], framework="np")
        self._loaded = True
        return self

    def _register_plugins(self) -> None:
        """The creators of the plugins the engines hold, in the registry before any plan is deserialized ("used
        to find plugin implementations during engine deserialization", NvInferRuntimeCommon.h), without the
        parser's needs (`parsing=False`): a read-only install loads them."""
        built = self.engines.manifest.get("plugin_implementation", {})
        needed = sorted(op for op, how in built.items() if not how.startswith(LOCAL_FUNCTION))
        if not needed:
            return
        here = register_plugins(self.trt, needed, parsing=False)
        missing = {op: how for op, how in here.items() if how.startswith(LOCAL_FUNCTION)}
        if missing:
            why = next(iter(missing.values()))
            raise EngineError(f"{self.engines.folder}: the engines run plugins {sorted(missing)} and this "
                              f"{self.trt.describe()} cannot register them ({why})")  # fmt: skip

    def _check_gpu(self) -> None:
        major, minor = torch.cuda.get_device_capability(self.device)
        target = f"SM{major}{minor}"
        built_for = self.engines.manifest["tensorrt"]["compute_capabilities"]
        if isinstance(built_for, list) and target not in built_for:
            raise EngineError(
                f"{self.engines.folder}: built for {', '.join(built_for)}, this GPU is {target}; "
                f"{self.engines.rebuild_hint()}"
            )

    def kv_in_place(self, past: str, present: str) -> bool:
        """Every decoder engine aliases `present` to `past` (one buffer); otherwise two take turns."""
        engines = {self.prefill_engine, self.step_engine}
        return all(self.sessions[name].aliased(present, past) for name in engines)

    def session(self, batch: PreparedBatch, max_new_tokens: int) -> TrtSession:
        check_request(self.limits, batch, max_new_tokens)  # before any GPU work
        return TrtSession(self.load(), batch, max_new_tokens)

    def follow_up(self, turn: TurnState, chunks: list[list[int]], max_new_tokens: int) -> TrtFollowUp:
        """A conversation's later turn on top of `turn` (reference_model/conversation.py)."""
        return TrtFollowUp(self, turn, chunks, max_new_tokens)


@dataclass
class CapturedStep:
    """A decode step captured in a CUDA graph, with the buffers its replays read and write."""

    graph: Any  # torch.cuda.CUDAGraph
    inputs: dict[str, torch.Tensor]
    outputs: dict[str, torch.Tensor]


class TrtSession:
    """One batch on the TensorRT engines (DecoderSession)."""

    def __init__(self, model: TrtModel, batch: PreparedBatch, max_new_tokens: int, cuda_graph: bool = True):
        refuse_several_turns(batch)
        if batch.query_len != model.query_len:
            raise GenerationError(f"the engines were built for query_len {model.query_len}, not {batch.query_len}")
        d = model.config.decoder
        self.batch = batch
        state = DecodeState(batch.layout, max_new_tokens, d.rope.max_position_embeddings, model.max_context)
        self._allocate(model, state, batch.layout.batch_size, cuda_graph)

    def _allocate(self, model: TrtModel, state: DecodeState, batch_size: int, cuda_graph: bool) -> None:
        """The KV buffers of `state` (zeroed on the engines' stream) and the captured steps' table."""
        d = model.config.decoder
        self.model, self.device, self.state, self.batch_size = model, model.device, state, batch_size
        dtype = model.sessions[model.step_engine].dtypes["past_key_values.0.key"]
        shape = (self.batch_size, d.num_kv_heads, self.state.capacity, d.head_dim)
        names = list(zip(past_names(d.num_layers), present_names(d.num_layers)))
        with torch.cuda.stream(model.stream):  # zero-filled where the engines will read it: ordered before them
            self.kv = KvBuffers(names, model.kv_in_place, lambda: torch.zeros(shape, dtype=dtype, device=self.device))
        self.vision: VisionOutputs | None = None
        self.use_cuda_graph = cuda_graph
        self.captured: dict[int, CapturedStep] = {}  # per KV turn (kv_buffers.py)

    def _device(self, arrays: dict[str, np.ndarray], session: EngineSession) -> dict[str, torch.Tensor]:
        return {
            name: torch.from_numpy(np.ascontiguousarray(a)).to(self.device, session.dtypes[name], non_blocking=True)
            for name, a in arrays.items()
        }

    def _run(self, name: str, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Bind and enqueue one engine on the engines' stream (the caller's `torch.cuda.stream` block)."""
        session = self.model.sessions[name]
        kv = self.kv.bindings() if self.kv.buffers.keys() & set(session.inputs) else {}  # the decoder's engines
        session.set_inputs({**inputs, **{k: v for k, v in kv.items() if k in session.inputs}})
        outputs = {
            out: torch.empty(session.output_shape(out), dtype=session.dtypes[out], device=self.device)
            for out in session.outputs
            if out not in kv
        }
        session.bind_outputs({**outputs, **{k: v for k, v in kv.items() if k in session.outputs}})
        session.execute(self.model.stream)
        if kv:
            self.kv.advance()
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
        turn = self.kv.turn
        with torch.cuda.stream(model.stream):
            captured = self.captured.get(turn)
            if captured is not None:  # replay: new values into the captured buffers, then the graph
                for name, array in arrays.items():
                    captured.inputs[name].copy_(torch.from_numpy(array), non_blocking=True)
                captured.graph.replay()
                self.kv.advance()
                logits = captured.outputs[LOGITS]
            else:
                inputs = self._device(arrays, session)
                outputs = self._run(model.step_engine, inputs)
                logits = outputs[LOGITS]
                if self.use_cuda_graph:
                    self._capture(turn, inputs, outputs)
            logits = logits.float().cpu()
        require_finite("decoder step", logits=logits)
        return logits

    def _capture(self, turn: int, inputs: dict[str, torch.Tensor], outputs: dict[str, torch.Tensor]) -> None:
        """Capture the step just run eagerly (its shapes and addresses, the KV bindings of `turn`) in a CUDA graph
        that replays the next steps of that turn. The capture is thread-local, as trtexec's (another thread's CUDA
        calls neither break it nor are broken); if TensorRT says the context cannot be captured (TensorRT-RTX's
        is_stream_capturable), its enqueue returns False, or the capture fails, steps run eagerly."""
        model = self.model
        session = model.sessions[model.step_engine]
        model.stream.synchronize()
        if not session.capturable(model.stream):
            self._no_graph("TensorRT reports the context cannot be captured on this stream")
            return
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph, stream=model.stream, capture_error_mode="thread_local"):
                session.execute(model.stream)
        except (RuntimeError, GenerationError) as e:
            self._no_graph(str(e))
            return
        self.captured[turn] = CapturedStep(graph, inputs, outputs)

    def _no_graph(self, why: str) -> None:
        self.use_cuda_graph = False
        warnings.warn(f"decode step not captured in a CUDA graph ({why}); running it eagerly", stacklevel=3)

    def kept_cache(self, row: int, length: int) -> list[torch.Tensor]:
        """One row's first `length` KV columns as stored (device tensors), layer by layer (key, value): what a
        conversation keeps."""
        with torch.cuda.stream(self.model.stream):
            return [t[row : row + 1, :, :length].clone() for t in self.kv.current()]

    def cache_arrays(self) -> list[np.ndarray]:
        self.synchronize()
        return cache_as_float([t.float().cpu().numpy() for t in self.kv.current()], self.model.kv_int8_scales)


class TrtFollowUp(TrtSession):
    """A later turn of a conversation (DecoderSession, batch of one): the kept KV columns copied into the session's
    buffers, then each chunk run through the one decoder engine as ONNX Runtime runs it through the merged graph
    (engines/onnxruntime/follow_up.py): a step of the chunk's tokens written after the kept columns, its block's
    latents and query given to the interaction layers. Its decode steps are any session's (captured, replayed)."""

    def __init__(self, model: TrtModel, turn: TurnState, chunks: list[list[int]], max_new_tokens: int,
                 cuda_graph: bool = True):  # fmt: skip
        if model.prefill_engine != DECODER:
            raise FusionError(f"{model.engines.folder}: a conversation's later turns run on the one decoder engine; "
                              "this folder (--plugins on) holds a prefill and a step engine")  # fmt: skip
        layouts = chunk_layouts(turn, chunks, model.config)
        longest = max(c.text_ids.shape[1] for c in layouts)
        if longest > model.limits["max_prompt"]:
            raise GenerationError(f"the turn's prompt is {longest} tokens; these engines take at most "
                                  f"{model.limits['max_prompt']} (rebuild with a larger --max-prompt)")  # fmt: skip
        rope = model.config.decoder.rope
        columns = sum(c.text_ids.shape[1] for c in layouts)
        state = resumed_state(turn, columns, max_new_tokens, rope.max_position_embeddings, model.max_context)
        self.layouts = layouts
        self._allocate(model.load(), state, 1, cuda_graph)
        with torch.cuda.stream(model.stream):  # ordered before the engines read them
            for buffer, kept in zip(self.kv.current(), turn.cache):
                buffer[:, :, : turn.length].copy_(kept, non_blocking=True)
        self.vision = VisionOutputs(None, turn.init_latents, turn.global_ctx)

    def prefill(self) -> torch.Tensor:
        model = self.model
        rope = model.config.decoder.rope
        clock = StageClock(self.synchronize)
        clock.lap("vision_encoder")  # nothing: the first turn's encoding is kept
        session = model.sessions[DECODER]
        with torch.cuda.stream(model.stream):
            for arrays in follow_up_feeds(self.layouts, self.state, model.embed_table, self.vision, rope):
                outputs = self._run(DECODER, self._device(arrays, session))
            logits = outputs[LOGITS].float().cpu()
        clock.lap("decoder_prefill")
        self.stage_seconds = clock.seconds
        require_finite("decoder prefill", logits=logits)
        return logits


def open_backend(path: Path, options: Any) -> TrtModel:
    """The `tensorrt` backend over an engine folder (engines/backends.py)."""
    return TrtModel(open_engines(path), device=options.device)
