"""ONNX Runtime backend: the artifact's graphs behind the same DecoderSession interface as the reference.

- The decoder's sessions (the prefill and the step) share one copy of the weights on CPU: they get the tensors
  of `decoder.onnx.data` as memory-mapped initializers instead of loading the file per session.
- The KV cache is one buffer pair per layer, sized prompt + max_new_tokens (or the fixed capacity of graphs
  exported with --max-context), bound as both `past_*` input and `present_*` output (IOBinding), so the graphs'
  scatter updates it in place and no step copies it.
- Graph inputs (embedding gather from the artifact's single table, image-token scatter, LongRoPE tables, masks,
  write columns) are prepared by `graph_inputs`, the same code every graph backend uses.
- On CPU, each decoder layer's KV write and attention run as ONNX Runtime's fused GroupQueryAttention in a step,
  and as causal query blocks in the prefill (`ort_attention`), and each vision encoder layer's attention as
  MultiHeadAttention (`ort_vision_attention`); with prepacked weights, split projections run as sliced weights
  (`ort_split_projections`). The graphs are rewritten in memory when the sessions are created;
  `attention="graph"` runs them as exported.
- On CPU, INT4 and INT8 weight-only layers run as MatMulNBits at the accuracy level asked for (matmul_nbits.py:
  1 = float32 compute, for validation; 4 = INT8 activations, for speed), whatever the attention form.
- CUDA is used when onnxruntime-gpu provides it (or when asked); CPU otherwise.
"""

from __future__ import annotations

import os
import platform
from pathlib import Path

import numpy as np
import onnx
import torch
from onnx.external_data_helper import ExternalDataInfo

from fusion_export.graph_inputs import LOGITS, past_names, present_names
from fusion_export.manifest import Artifact
from fusion_export.precision import Precision
from reference_model.conversation import TurnState, chunk_layouts, resumed_state
from reference_model.errors import FusionError
from reference_model.generation import DecodeState, GenerationError, StageClock, require_finite
from reference_model.input_files import read_tensor
from reference_model.model import VisionOutputs
from reference_model.sequence import PreparedBatch

from ..feeds import (
    StepFeeds,
    cache_as_float,
    follow_up_feeds,
    prefill_inputs,
    refuse_several_turns,
    vision_inputs,
)
from .follow_up import merged_decoder
from .matmul_nbits import (
    ACCURACY_LEVELS,
    SPEED_LEVEL,
    QuantizedLayerRewrite,
    QuantizedLayers,
    SharedOperands,
    rewrite_graph,
)
from .providers import Device, resolve_providers

STEP_CACHE = "past_key_values.0.key"
SUB_BYTE_TYPES = {onnx.TensorProto.INT4, onnx.TensorProto.UINT4}


class SharedInitializers:
    """External initializers of several graphs as OrtValues over one read-only memory map per data file.

    Graphs that point at the same bytes (location, offset, length) get the same OrtValue, so a weight shared
    on disk is shared in memory too; names are looked up per graph (anonymous constants may collide).
    """

    def __init__(self) -> None:
        self.maps: dict[Path, np.memmap] = {}
        self.values: dict[tuple, object] = {}

    def for_graph(self, path: Path, skip: set[str] = frozenset()) -> dict[str, object]:
        """The graph's external initializers but `skip` (those an in-memory rewrite no longer reads)."""
        return self.for_model(onnx.load(path, load_external_data=False), path, skip)

    def for_model(self, model: onnx.ModelProto, path: Path, skip: set[str] = frozenset()) -> dict[str, object]:
        """for_graph of a model held in memory whose external data lies beside `path`."""
        import onnxruntime as ort

        out = {}
        for tensor in model.graph.initializer:
            if tensor.data_location != onnx.TensorProto.EXTERNAL or tensor.name in skip:
                continue
            if tensor.data_type in SUB_BYTE_TYPES:  # no numpy view of packed values: the session reads the file
                continue
            info = ExternalDataInfo(tensor)
            data_path = (path.parent / info.location).resolve()
            key = (data_path, info.offset, info.length, tensor.data_type, tuple(tensor.dims))
            if key not in self.values:
                if data_path not in self.maps:
                    self.maps[data_path] = np.memmap(data_path, dtype=np.uint8, mode="r")
                raw = self.maps[data_path][info.offset : info.offset + info.length]
                array = raw.view(onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type)).reshape(tuple(tensor.dims))
                self.values[key] = ort.OrtValue.ortvalue_from_numpy(array)
            out[tensor.name] = self.values[key]
        return out


def cpu_int8_dot(machine: str | None = None, flags: set[str] | None = None) -> bool:
    """Whether this CPU multiplies int8 without saturating: ONNX Runtime's x86 W8A8 kernels (u8s8) sum pairs of
    products into int16 with saturation unless the CPU has VNNI (AVX512-VNNI, AVX-VNNI) or AMX; ARM's dot-product
    kernels accumulate in int32. Measured here on a Zen 3 EPYC (AVX2 only): the W8A8 demo artifact's vision
    outputs came out 1.2-1.3x past their int8 gates with the integer kernels, within them with float math on the
    dequantized values (what TensorRT's int32 accumulation computes)."""
    if (machine or platform.machine()).lower() not in ("x86_64", "amd64", "i686", "x86"):
        return True
    if flags is None:
        try:
            with open("/proc/cpuinfo") as f:
                flags = set(next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), []))
        except OSError:
            return True  # unknown: trust the integer kernels
    return bool({"avx512_vnni", "avx_vnni", "amx_int8"} & flags)


class OrtModel:
    """An artifact in ONNX Runtime (the `onnxruntime` backend): vision encoder, decoder prefill and step sessions,
    the embedding table. Opening checks the artifact and the provider; the sessions are created on first use."""

    kind = "onnxruntime"

    def __init__(
        self,
        artifact: Artifact,
        device: Device | None = None,
        threads: int | None = None,
        weights: str = "auto",
        attention: str = "fused",
        int8_kernels: str = "auto",
        accuracy_level: int = SPEED_LEVEL,
        prefill_arena: bool = True,
    ):
        """weights (CPU): "shared" = the decoder sessions read one memory-mapped copy of the weights;
        "packed" = the step and the prefill each keep ONNX Runtime's prepacked copy (GEMM/GEMV-friendly
        layout, ~11% faster decode on the `small` preset, twice the weights' memory); "auto" = packed while two
        copies of fp32 decoder weights take under a quarter of the machine's memory, else shared.
        attention (CPU): "fused" = the graphs rewritten for ONNX Runtime's kernels (ort_attention) where the
        graphs allow it; "graph" = the graphs' own ops, as exported.
        int8_kernels (W8A8 artifacts on CPU): "on" = ONNX Runtime's integer kernels; "off" = the same quantized
        math in float32 (DequantizeLinear, then float MatMul); "auto" = on where the CPU has an int8 dot-product
        instruction (`cpu_int8_dot`), off on x86 without one, whose u8s8 kernels saturate.
        accuracy_level (CPU, INT4 / INT8 weight-only layers as MatMulNBits): 1 = float32 compute on the dequantized
        weights (validation: TensorRT's W4A16 arithmetic); 4 = activations quantized to INT8 inside the kernel
        (speed; ~0.6% relative error per layer). With int8 kernels off, INT8 layers run as float math either way.
        prefill_arena (CPU): the vision and prefill sessions keep ONNX Runtime's memory arena (faster prefill);
        False returns their memory after each run (a long-running server: flat memory across batch shapes)."""
        if weights not in ("auto", "shared", "packed"):
            raise FusionError(f"--ort-weights {weights!r}: choose auto, shared or packed")
        if attention not in ("fused", "graph"):
            raise FusionError(f"--ort-attention {attention!r}: choose fused or graph")
        if int8_kernels not in ("auto", "on", "off"):
            raise FusionError(f"--ort-int8-kernels {int8_kernels!r}: choose auto, on or off")
        if accuracy_level not in ACCURACY_LEVELS:
            levels = ", ".join(f"{level} ({what})" for level, what in ACCURACY_LEVELS.items())
            raise FusionError(f"--ort-accuracy-level {accuracy_level!r}: choose {levels}")
        self.accuracy_level, self.prefill_arena = accuracy_level, prefill_arena
        self.quantized_form = ""  # set by load(), with quantized_layers (graph -> QuantizedLayers)
        self.quantized_layers: dict[str, QuantizedLayers] = {}
        self.attention = attention
        self.attention_form = "as exported"  # set by load()
        self.attends_to_valid_columns = False  # True once load() fused the step graph's attention
        self.artifact, self.threads = artifact, threads
        self.config = artifact.config
        self.model_dir = artifact.model_dir
        self.precision, self.query_len = artifact.precision, artifact.query_len
        self.quantization = artifact.quantization
        self.kv_int8_scales = artifact.kv_int8_scales
        self.max_context = artifact.max_context
        self.providers = resolve_providers(device)
        self.on_cpu = self.providers[0] == "CPUExecutionProvider"
        cache_input = next(i for i in artifact.manifest["graphs"]["decoder_step"]["inputs"] if i["name"] == STEP_CACHE)
        self.cache_dtype = np.dtype(
            onnx.helper.tensor_dtype_to_np_dtype(onnx.TensorProto.DataType.Value(cache_input["dtype"]))
        )
        decoder_bytes = artifact.manifest["files"][artifact.manifest["graphs"]["decoder_step"]["weights"]]["bytes"]
        memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        small = 2 * decoder_bytes < memory / 4
        self.packed = self.on_cpu and (
            weights == "packed" or (weights == "auto" and small and artifact.precision is Precision.fp32)
        )
        saturates = self.on_cpu and self.quantization == "int8" and not cpu_int8_dot()
        self.int8_kernels = int8_kernels == "on" or (int8_kernels == "auto" and not saturates)
        self._loaded = False
        self._follow_up_decoder = None  # the one decoder graph's session (follow_up_decoder)

    def describe(self) -> str:
        layout = ("prepacked per session" if self.packed else "one shared copy") if self.on_cpu else "on the device"
        int8 = "" if self.int8_kernels else ", INT8 as float math on dequantized values"
        quantized = f", quantized layers {self.quantized_form}" if self.quantized_form else ""
        return (
            f"onnxruntime {self.providers[0]}, {self.precision} graphs from {self.artifact.folder}, weights {layout}, "
            f"attention {self.attention_form}{int8}{quantized}"
        )

    def load(self) -> OrtModel:
        """Create the sessions and read the embedding table (once)."""
        if self._loaded:
            return self
        import onnxruntime as ort

        ort.disable_telemetry_events()  # nothing leaves the machine (tests/test_no_network.py watches for it)
        artifact = self.artifact
        embeddings = artifact.manifest["embeddings"]
        # a regular file; a corrupt header or a missing tensor is named, not a traceback
        self.embed_table = read_tensor(artifact.folder / embeddings["file"], embeddings["tensor"], framework="np")

        # quantized layers' operands: built once for all graphs (the rewrite's cache is dropped once the sessions
        # exist), read by the sessions from one copy that lives as long as they do
        self._rewrite = QuantizedLayerRewrite(self.accuracy_level, int8_as_float=not self.int8_kernels)
        self._operands = SharedOperands()
        layers: dict[str, QuantizedLayers] = {}
        path = artifact.graph_path("vision_encoder")
        model, form = self._fused_vision(path)
        model, layers["vision_encoder"] = self._quantized_layers(path, model)
        opts = self._options()
        self._operands.hand_in(opts, layers["vision_encoder"])
        self.vision = self._session(path, opts, model)
        forms = [f"vision_encoder: {form}"]
        self._shared = SharedInitializers()  # keeps the memory maps alive as long as the sessions
        self.prefill_session, form, _, layers["decoder_prefill"] = self._decoder_session("decoder_prefill")
        forms.append(f"decoder_prefill: {form}")
        self.step_session, form, fused, layers["decoder_step"] = self._decoder_session("decoder_step")
        forms.append(f"decoder_step: {form}")
        self._rewrite = None
        for done in layers.values():
            done.initializers.clear()  # self._operands holds them
        self.quantized_layers = layers
        self.attends_to_valid_columns = fused  # a fused step reads only the written KV columns (bench roofline)
        self.step_input_names = {i.name for i in self.step_session.get_inputs()}
        self.attention_form = "; ".join(forms)
        self.quantized_form = self._describe_layers(layers)
        self._loaded = True
        return self

    def _describe_layers(self, layers: dict[str, QuantizedLayers]) -> str:
        if not self.on_cpu:
            return "as exported (MatMulNBits is used on CPU only)" if self.quantization else ""
        rewritten = {name: done for name, done in layers.items() if done.kernels or done.int8_float}
        if not rewritten:
            return ""
        level = f"MatMulNBits accuracy level {self.accuracy_level} ({ACCURACY_LEVELS[self.accuracy_level]})"
        return f"{level}: " + "; ".join(f"{name}: {done.describe()}" for name, done in rewritten.items())

    def _quantized_layers(self, path: Path, model: bytes | None) -> tuple[bytes | None, QuantizedLayers]:
        """The graph (as rewritten so far) with its weight-only layers as MatMulNBits (CPU; matmul_nbits.py)."""
        if not self.on_cpu:
            return model, QuantizedLayers()
        return rewrite_graph(path, model, self._rewrite)

    def _options(self, spin: bool = False):
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.log_severity_level = 3  # in-place TensorScatter notices are not errors
        if self.threads:
            opts.intra_op_num_threads = self.threads
        if not spin:
            # Each session has its own thread pool. Spinning after the vision and prefill runs (a few long
            # ops per request, nothing gained) took the cores from the step session's pool: the first 3-5
            # decode steps ran 2-3x slower on 2 cores. Only the step session, many short ops, spins.
            opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
            if self.on_cpu and not self.prefill_arena:
                # The vision and prefill sessions run once per batch on that batch's shapes (rows, prompt lengths);
                # their arenas keep every region they grew (doubling, ~1 GB at a time) and touched more of it as
                # shapes moved around: a server soak's RSS grew 18-30% in 120-300 requests. Without the arena their
                # buffers go back to malloc after each run (TTFT +7% for a batch of 4, docs/serving.md); the
                # step session, many short ops per token, keeps its arena.
                opts.enable_cpu_mem_arena = False
        if not self.int8_kernels:
            opts.add_session_config_entry("session.disable_quant_qdq", "1")  # DQ -> float MatMul, unfused
        # ONNX Runtime's x86 CPU kernels have no fp16 MatMul: session set-up converts every fp16 weight to a
        # float32 copy (a full-size fp16 decoder would need ~18 GB per session). fp16 artifacts are for GPUs;
        # to validate them on a CPU, graph rewrites are switched off so weights are cast per call instead,
        # slowly but within the fp16 footprint.
        if self.on_cpu and self.artifact.precision is Precision.fp16:
            opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
            opts.enable_cpu_mem_arena = False  # hand each per-call float32 weight copy straight back
        return opts

    def _session(self, path: Path, opts, model: bytes | None = None):
        import onnxruntime as ort

        if model is not None:  # rewritten in memory: its external weights are still read from the artifact
            opts.add_session_config_entry("session.model_external_initializers_file_folder_path", str(path.parent))
        created = ort.InferenceSession(model or str(path), opts, providers=self.providers)
        if created.get_providers()[0] != self.providers[0]:  # ORT falls back silently when CUDA fails
            raise FusionError(
                f"{path.name}: ONNX Runtime could not start {self.providers[0]} "
                f"(it fell back to {created.get_providers()[0]}); check the CUDA/cuDNN installation"
            )
        return created

    def _decoder_session(self, name: str):
        """A decoder graph's session, the form its attention runs in, whether its attention was rewritten and its
        quantized layers' rewrite."""
        path, opts = self.artifact.graph_path(name), self._options(spin=name == "decoder_step")
        model, form = self._fused_attention(path)
        fused = model is not None
        model, layers = self._quantized_layers(path, model)
        if self.on_cpu and not self.packed:
            # One memory-mapped copy of the decoder weights for all sessions, not repacked per session
            # (prepacking would give each session a private copy of every MatMul weight). Not with MatMulNBits
            # nodes: unpacked, the kernel dequantizes its whole weight on every call (a `small` step's INT4 layers,
            # one thread: 73 ms against 1.6 ms prepacked); float weights are then prepacked per session too.
            if not layers.kernels:
                opts.add_session_config_entry("session.disable_prepacking", "1")
            for init_name, value in self._shared.for_graph(path, skip=layers.removed).items():
                opts.add_initializer(init_name, value)
        self._operands.hand_in(opts, layers)
        # packed: each session loads and prepacks its own copy (its prepacked LM head streams at ~36 GB/s here
        # against ~25 unpacked). ONNX Runtime 1.32 prepacks handed-in initializers too (a 64 MB float32 weight
        # given with add_initializer: +64 MB per session with prepacking on, +0 off).
        return self._session(path, opts, model), form, fused, layers

    def _fused_vision(self, path: Path) -> tuple[bytes | None, str]:
        """The vision encoder with its eager attention as ONNX Runtime's MultiHeadAttention (ort_vision_attention;
        CPU, float32 graphs), or None and the form it runs in."""
        if self.attention == "graph":
            return None, "as exported (--ort-attention graph)"
        if not self.on_cpu:
            return None, "as exported (MultiHeadAttention is used on CPU only)"
        from .vision_attention import fuse_vision_graph

        model, form = fuse_vision_graph(path)
        return model, form if model is not None else f"as exported ({form})"

    def _fused_attention(self, path: Path) -> tuple[bytes | None, str]:
        """The decoder graph rewritten for ONNX Runtime's CPU kernels (ort_attention; float32 graphs), or None and
        the form it runs in."""
        if self.attention == "graph":
            return None, "as exported (--ort-attention graph)"
        if not self.on_cpu:
            return None, "as exported (GroupQueryAttention is used on CPU only)"
        from .attention import fuse_attention

        d = self.config.decoder
        # split projections only where each session prepacks its own weights (ort_split_projections.py)
        model, form = fuse_attention(path, d.num_layers, d.num_heads, d.num_kv_heads, d.head_dim, self.packed)
        if model is None:
            return None, f"as exported ({form})"
        return model, form

    def session(self, batch: PreparedBatch, max_new_tokens: int) -> OrtSession:
        return OrtSession(self, batch, max_new_tokens)

    def follow_up_decoder(self):
        """The session of the one decoder graph a conversation's later turns prefill through (follow_up.py): made
        once, on the first follow-up or when `serve` starts. It reads the decoder weights from the other sessions'
        memory map where they share one copy; quantized layers run as exported (DequantizeLinear, then MatMul)."""
        if self._follow_up_decoder is None:
            self.load()
            model, path = merged_decoder(self.artifact), self.artifact.graph_path("decoder_step")
            opts = self._options()
            if self.on_cpu and not self.packed:  # one memory-mapped copy of the weights, as _decoder_session
                opts.add_session_config_entry("session.disable_prepacking", "1")
                for name, value in self._shared.for_model(model, path).items():
                    opts.add_initializer(name, value)
            self._follow_up_decoder = self._session(path, opts, model.SerializeToString())
        return self._follow_up_decoder

    def follow_up(self, turn: TurnState, chunks: list[list[int]], max_new_tokens: int) -> OrtFollowUp:
        """A conversation's later turn on top of `turn` (reference_model/conversation.py, follow_up.py)."""
        return OrtFollowUp(self, turn, chunks, max_new_tokens)


def open_backend(path: Path, options) -> OrtModel:
    """The `onnxruntime` backend over an artifact folder (engines/backends.py)."""
    from fusion_export.manifest import open_artifact

    return OrtModel(
        open_artifact(path),
        options.provider,
        options.threads,
        options.ort_weights or "auto",
        options.ort_attention or "fused",
        options.ort_int8_kernels or "auto",
        SPEED_LEVEL if options.ort_accuracy_level is None else options.ort_accuracy_level,
        options.ort_prefill_arena is not False,
    )


class OrtSession:
    """One batch on ONNX Runtime (DecoderSession); inputs prepared by `graph_inputs`, as for every graph backend."""

    def __init__(self, model: OrtModel, batch: PreparedBatch, max_new_tokens: int):
        model.load()
        refuse_several_turns(batch)
        if batch.query_len != model.query_len:
            raise GenerationError(
                f"the artifact was exported for query_len {model.query_len}, the request asks for "
                f"{batch.query_len}; re-export with --query-len {batch.query_len}"
            )
        d = model.config.decoder
        self.batch = batch
        self._start(model, DecodeState(batch.layout, max_new_tokens, d.rope.max_position_embeddings,
                                       model.max_context), max_new_tokens)  # fmt: skip

    def _start(self, model: OrtModel, state: DecodeState, max_new_tokens: int, kept: list | None = None) -> None:
        """The KV buffers and the step's feeds for `state`; `kept`: columns a conversation's earlier turns wrote."""
        import onnxruntime as ort

        d = model.config.decoder
        self.state, self.model = state, model
        self.batch_size = state.key_valid.shape[0]
        shape = (self.batch_size, d.num_kv_heads, self.state.capacity, d.head_dim)
        device = "cpu" if model.on_cpu else "cuda"
        # Unwritten columns are masked but must not be NaN: zeros. np.zeros per buffer takes zero pages from the
        # OS, touched only where written or read; copying one zeroed array cost ~200 ms of TTFT at capacity 4096.
        buffers = [np.zeros(shape, dtype=model.cache_dtype) for _ in range(2 * d.num_layers)]
        for buffer, columns in zip(buffers, kept or []):
            buffer[:, :, : columns.shape[2]] = columns
        self.cache = [ort.OrtValue.ortvalue_from_numpy(buffer, device) for buffer in buffers]
        self.past_names, self.present_names = past_names(d.num_layers), present_names(d.num_layers)
        self.vision: VisionOutputs | None = None
        self.feeds = StepFeeds(self.state, model.embed_table, d.rope, max_new_tokens)
        self.fused_feeds = None
        if model.attends_to_valid_columns:  # the fused step graph takes its lengths, bias and RoPE rows from here
            from .attention import FusedStepFeeds

            self.fused_feeds = FusedStepFeeds(
                model.step_input_names, self.batch_size, 1, self.state.capacity, d.head_dim
            )
        self._step_binding = None  # bound once, on the first step: the feeds are updated in place

    def _run(self, session, inputs: dict[str, np.ndarray]) -> np.ndarray:
        binding = session.io_binding()
        wanted = {i.name for i in session.get_inputs()}  # a specialised graph may read fewer
        for name, value in inputs.items():
            if name in wanted:
                binding.bind_cpu_input(name, np.ascontiguousarray(value))
        binding.bind_output(LOGITS, "cpu")  # first bound output = get_outputs()[0]
        for past, present, value in zip(self.past_names, self.present_names, self.cache):
            binding.bind_ortvalue_input(past, value)
            binding.bind_ortvalue_output(present, value)  # aliased: the scatter writes in place
        session.run_with_iobinding(binding)
        return binding.get_outputs()[0].numpy()

    def synchronize(self) -> None:
        """run_with_iobinding returns when the outputs are on the host: nothing is left queued."""

    def prefill(self) -> torch.Tensor:
        model, rope = self.model, self.model.config.decoder.rope
        clock = StageClock(self.synchronize)
        outputs = model.vision.run(None, vision_inputs(self.batch, model.embed_table))
        clock.lap("vision_encoder")
        self.vision = VisionOutputs(*(torch.from_numpy(x) for x in outputs))
        require_finite("vision encoder", **vars(self.vision))
        inputs = prefill_inputs(self.batch, model.embed_table, *outputs, rope)
        logits = torch.from_numpy(self._run(model.prefill_session, inputs))
        clock.lap("decoder_prefill")
        self.stage_seconds = clock.seconds
        require_finite("decoder prefill", logits=logits)
        return logits

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        import onnxruntime as ort

        arrays = self.feeds.advance(tokens)
        if self.fused_feeds is not None:
            self.fused_feeds.update(arrays)  # in place: bound by reference like the others
        if self._step_binding is None:  # inputs, outputs and cache all bound once, by reference
            binding = self.model.step_session.io_binding()
            if self.fused_feeds is not None:
                arrays = {**arrays, **self.fused_feeds.arrays}
            for name, array in arrays.items():
                if name in self.model.step_input_names:
                    binding.bind_ortvalue_input(name, ort.OrtValue.ortvalue_from_numpy(array))
            self._logits = np.zeros((self.batch_size, self.model.config.decoder.vocab_size), np.float32)
            binding.bind_ortvalue_output(LOGITS, ort.OrtValue.ortvalue_from_numpy(self._logits))
            for past, present, value in zip(self.past_names, self.present_names, self.cache):
                binding.bind_ortvalue_input(past, value)
                binding.bind_ortvalue_output(present, value)
            self._step_binding = binding
        self.model.step_session.run_with_iobinding(self._step_binding)
        logits = torch.from_numpy(self._logits.copy())  # the next step overwrites the bound buffer
        require_finite("decoder step", logits=logits)
        return logits

    def kept_cache(self, row: int, length: int) -> list[np.ndarray]:
        """One row's first `length` KV columns as stored, layer by layer (key, value): what a conversation keeps."""
        return [value.numpy()[row : row + 1, :, :length].copy() for value in self.cache]

    def cache_arrays(self) -> list[np.ndarray]:
        """The KV buffers (B, kv_heads, capacity, head_dim), layer by layer (key, value), as numpy copies of the
        values attention reads (an INT8 cache dequantized)."""
        copies = [value.numpy().copy() for value in self.cache]  # numpy() is a view of memory the session frees
        return cache_as_float(copies, self.model.kv_int8_scales)


class OrtFollowUp(OrtSession):
    """A later turn of a conversation (DecoderSession, batch of one): the kept columns, each chunk through the one
    decoder graph (follow_up.py), then the step graph's decode steps."""

    def __init__(self, model: OrtModel, turn: TurnState, chunks: list[list[int]], max_new_tokens: int):
        model.load()
        d = model.config.decoder
        self.layouts = chunk_layouts(turn, chunks, model.config)
        columns = sum(c.text_ids.shape[1] for c in self.layouts)
        state = resumed_state(turn, columns, max_new_tokens, d.rope.max_position_embeddings, model.max_context)
        self.batch, self.max_new_tokens = None, max_new_tokens
        self._start(model, state, max_new_tokens, kept=turn.cache)
        self.vision = VisionOutputs(None, turn.init_latents, turn.global_ctx)

    def prefill(self) -> torch.Tensor:
        model, rope = self.model, self.model.config.decoder.rope
        clock = StageClock(self.synchronize)
        clock.lap("vision_encoder")  # nothing: the first turn's encoding is kept
        decoder = model.follow_up_decoder()
        for inputs in follow_up_feeds(self.layouts, self.state, model.embed_table, self.vision, rope):
            logits = torch.from_numpy(self._run(decoder, inputs))
        # the step's feeds start where the chunks left the state
        self.feeds = StepFeeds(self.state, model.embed_table, rope, self.max_new_tokens)
        clock.lap("decoder_prefill")
        self.stage_seconds = clock.seconds
        require_finite("decoder prefill", logits=logits)
        return logits
