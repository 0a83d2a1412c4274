"""What `fusion-export build` will build, computed without TensorRT: one optimization profile per engine, the
device memory the engines will need, the largest context that fits a device, and the equivalent command lines.

Two engines: the vision encoder, and one decoder for prefill and decode (`decoder`), built from the graph
fusion_export/decoder_merge.py makes of the artifact's prefill and step graphs, so the decoder's weights are held
once. Artifacts exported with `--plugins on` keep two decoder engines (`decoder_prefill`, `decoder_step`, each
holding the decoder): their InteractionAttention plugin takes a fixed number of latent rows.

Profiles come from the artifact manifest (which dims are symbolic) and the build limits:

| dim | graphs | min | opt | max |
| --- | --- | --- | --- | --- |
| `batch` | all | 1 | `opt_batch` | `max_batch` |
| `instruct_len` | vision encoder | 1 | min(32, max) | `max_question_tokens` |
| `seq` | prefill | image tokens + latents + 1 | min(typical prompt, max) | `max_prompt` (capacity - 1) |
| `new_tokens` | step | 1 | 1 | `max_step_tokens` |
| `tokens` | decoder (both phases) | 1 | 1 | max(`max_prompt`, `max_step_tokens`) |
| `latents`, `context` | decoder | 0 (a decode step) | 0 | query_len, (s*w)^2 (a prefill) |
| `capacity` | decoder graphs (when not fixed at export) | C | C | C |

The decoder engine's one profile spans both phases; its opt point is a decode step, the shape a request runs most
often: enterprise TensorRT tunes kernels for the opt point, TensorRT-RTX compiles kernels specialized to each shape
it meets at run time (`DynamicShapesKernelSpecializationStrategy`, lazy by default). One profile, not one per
phase: TensorRT-RTX 1.7.1 holds part of the weights again per profile (docs/tensorrt.md section 4.1).

The KV capacity C is fixed per engine (min = opt = max): the runtime allocates the cache once, so decode steps
never reallocate and can be captured in a CUDA graph.

Memory, estimated per request shape (an engine's real scratch size is only known after deserializing it, on the
target), counted by the runtime's own allocation rules (device_memory.py): engine weights (each engine holds every
weight its network reads: the decoder engine the decoder and the interaction layers once; two decoder engines the
decoder twice), the KV cache at capacity C (one buffer per tensor where the engines update it in place, TensorScatter
graphs; two that take turns otherwise), one scratch block the contexts share (the largest engine's activations: they
never run at once), and a fixed runtime overhead.

Weights are counted from the graphs' own initializers as stored (read from the protos, no weights loaded; the
decoder engine's are the union of its two graphs'): INT4 packed two per byte with its block scales, INT8 one byte
with its column scales, float in its own type; the interaction layers are what the prefill graph holds beyond the
step graph. So a quantized artifact is planned from what it holds, and the plan names what it planned for
(activations, weight quantization, KV cache dtype).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import onnx
import onnx_ir as ir

from fusion_export.decoder_merge import merged_inputs
from fusion_export.graph_inputs import past_names, present_names
from fusion_export.plugin_ops.onnx_forms import INTERACTION_ATTENTION
from fusion_export.precision import Precision
from reference_model.errors import FusionError

from .device_memory import kv_buffers, shared_scratch_bytes, writes_in_place

GB = 1e9
RUNTIME_OVERHEAD_BYTES = int(1.0 * GB)  # CUDA context, TensorRT runtime, cuBLAS/cuDNN handles (an assumption)
TYPICAL_PROMPT_TEXT = 64  # text tokens of a typical prompt (template + question), for the `seq` opt point
DEFAULT_MAX_QUESTION_TOKENS = 512  # vision engine profile: the tower's attention grows as (image + question)^2
# a sanity bound on requests per batch (build --max-batch, bench --batch): each row carries 5 float crops (8.8 MB
# at 384 px) and its KV cache, so 1024 is far past any device's memory for these models
MAX_BATCH = 1024

# What each flavour's builder takes, for the checks made without TensorRT (`build --dry-run`); the real build asks
# the installed module (trt_api.Trt.compute_capabilities / has_timing_cache), and a test holds this table to it.
# TensorRT-RTX: the SM* members of its ComputeCapability enum (1.7.1); enterprise TensorRT builds for the GPU it
# runs on and takes no list. Timing caches: TensorRT-RTX's are no-ops (deprecated since 1.2).
COMPUTE_CAPABILITIES: dict[str, tuple[str, ...]] = {
    "tensorrt": (),
    "tensorrt-rtx": ("SM75", "SM80", "SM86", "SM89", "SM120", "SM121"),
}
HAS_TIMING_CACHE: dict[str, bool] = {"tensorrt": True, "tensorrt-rtx": False}


@dataclass(frozen=True)
class DeviceMemory:
    total_gb: float
    reserved_gb: float  # kept for what is not the engines (OS and CPU side on Jetson's shared memory, display)
    note: str
    # Jetson: the CPU and the GPU share the memory, so what the runtime holds on the host (the token-embedding
    # table it gathers from, engines/tensorrt/runtime.py) comes out of the same budget
    shared: bool = False

    @property
    def usable_bytes(self) -> int:
        return int((self.total_gb - self.reserved_gb) * GB)


DEVICE_PRESETS = {
    "agx-orin-64": DeviceMemory(64, 8, "Jetson AGX Orin 64 GB: memory shared with the CPU; 8 GB kept for the OS", True),
    "orin-nx-16": DeviceMemory(16, 3, "Jetson Orin NX 16 GB: memory shared with the CPU; 3 GB kept for the OS", True),
    "orin-nano-8": DeviceMemory(8, 2, "Jetson Orin Nano 8 GB: memory shared with the CPU; 2 GB kept for the OS", True),
    "rtx-4090": DeviceMemory(24, 1, "GeForce RTX 4090 24 GB; 1 GB kept for the display and driver"),
    "h100-80": DeviceMemory(80, 1, "H100 80 GB (TensorRT 10/11 only: TensorRT-RTX has no SM90 target)"),
}


def parse_device_memory(text: str) -> DeviceMemory:
    """A preset name, or a number of GB that the engines may use entirely."""
    if text in DEVICE_PRESETS:
        return DEVICE_PRESETS[text]
    try:
        gb = float(text)
    except ValueError:
        raise FusionError(
            f"--device-memory {text!r}: a preset ({', '.join(DEVICE_PRESETS)}) or a number of GB"
        ) from None
    if not 0 < gb < math.inf:
        raise FusionError(f"--device-memory {text!r}: must be a positive number of GB")
    return DeviceMemory(gb, 0, f"{gb:g} GB given on the command line")


@dataclass(frozen=True)
class BuildLimits:
    """What the engines must accept; None: the default (the graph's own fixed value where it has one)."""

    max_batch: int = 1
    opt_batch: int = 1
    max_prompt: int | None = None  # prefill positions; default capacity - 1
    max_question_tokens: int | None = None  # vision encoder question length; default min(model's, 512)
    max_step_tokens: int = 1  # tokens per decode step (1: plain decoding)
    max_context: int | None = None  # KV capacity of dynamic-capacity graphs; fixed graphs keep theirs


DECODER = "decoder"  # the one decoder engine's name (and its file's stem)


@dataclass
class GraphPlan:
    name: str  # the engine's
    onnx: str  # the artifact graph's file; the decoder engine: its two graphs' files joined by " + "
    profile: dict[str, dict[str, list[int]]]  # input -> {"min", "opt", "max"} shapes (inputs with symbolic dims)
    activation_bytes: int  # estimated scratch at the profile's max
    sources: list[str] = field(default_factory=list)  # artifact graphs it is built from (the decoder: two, merged)


@dataclass
class EngineWeights:
    bytes: int
    by_dtype: dict[str, int]  # ONNX type name -> bytes (INT4 packed), e.g. {"INT4": .., "FLOAT16": .. (scales)}


@dataclass
class PlanSource:
    """What a plan reads of an artifact: its config and export choices, its graphs' inputs, the weights each engine
    holds and its KV cache. `artifact_source` reads them from an artifact, `planned_export.planned_source`
    computes them for an export not yet made."""

    config: Any  # FusionConfig
    query_len: int
    precision: str  # the activations': fp32 or fp16
    max_context: int | None  # a KV capacity fixed at export
    io: dict[str, dict[str, Any]]  # graph -> {"file", "inputs"} as the manifest lists them
    engine_weights: dict[str, EngineWeights]  # per engine
    decoder_weights: int  # what both decoder graphs read
    interaction_weights: int  # what only the prefill reads
    kv_dtype: str
    kv_value_bytes: int
    kv_write_ops: list[str]
    one_decoder: bool
    quantization: dict[str, Any] | None
    embedding_bytes: int  # the token-embedding table the runtime holds on the host


@dataclass
class BuildPlan:
    precision: str
    query_len: int
    capacity: int
    capacity_fixed_at_export: bool
    limits: dict[str, int]
    graphs: list[GraphPlan]
    memory: dict[str, int]  # weights, kv_cache, activations, overhead, total (bytes)
    # what the memory is planned for: the artifact's weight quantization ({"mode", and "block_size", "method" where
    # the manifest records them}; None: float weights) and the KV cache's type
    quantization: dict[str, Any] | None = None
    kv_cache_dtype: str = ""  # int8, fp16 or fp32
    weights: dict[str, EngineWeights] = field(default_factory=dict)  # per engine, as its graphs store them
    # the weights both phases read (the decoder), those only a prefill reads (the interaction layers), and how many
    # engines hold the decoder: 1, or 2 for `--plugins on` artifacts (a prefill and a step engine)
    decoder_weights: int = 0
    interaction_weights: int = 0
    decoder_engines: int = 1
    # the engines update the KV cache in place (TensorRT's KV-cache update layer: one buffer per tensor), or not (two
    # buffers that take turns, engines/tensorrt/kv_buffers.py); the ONNX ops that write it
    kv_in_place: bool = False
    kv_buffers: int = 2
    kv_write_ops: list[str] = field(default_factory=list)
    device: dict[str, Any] | None = None  # the device budget checked against, when one was given
    largest_context: int | None = None  # the largest capacity that fits the device
    notes: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    def planned_for(self) -> str:
        """What the plan's memory is for, in words: activations, weights, KV cache."""
        q = self.quantization
        if q is None:
            weights = f"{self.precision} weights"
        else:
            details = [f"blocks of {q['block_size']}"] if "block_size" in q else []
            details += [q["method"]] if "method" in q else []
            weights = f"{q['mode']} weights" + (f" ({', '.join(details)})" if details else "")
        return f"{self.precision} activations, {weights}, KV cache {self.kv_cache_dtype}"


def bytes_per_value(precision: str) -> int:
    """Bytes of one activation (and float weight) of an fp32 or fp16 artifact."""
    return {"fp32": 4, "fp16": 2}[precision]


def _shape(dims: list, values: dict[str, int]) -> list[int]:
    return [values[d] if isinstance(d, str) else int(d) for d in dims]


def _profile(inputs: list[dict[str, Any]], ranges: dict[str, tuple[int, int, int]]) -> dict[str, dict[str, list]]:
    profile = {}
    for entry in inputs:
        symbolic = [d for d in entry["shape"] if isinstance(d, str)]
        if not symbolic:
            continue
        unknown = [d for d in symbolic if d not in ranges]
        if unknown:
            raise FusionError(f"input {entry['name']}: no profile range for dim(s) {', '.join(unknown)}")
        profile[entry["name"]] = {
            point: _shape(entry["shape"], {d: r[i] for d, r in ranges.items()})
            for i, point in enumerate(("min", "opt", "max"))
        }
    return profile


def _activations(config, precision: str, batch: int, prompt: int, question: int, step: int, capacity: int):
    """Estimated scratch per engine at the profile's max (bytes). Upper bounds on purpose: every intermediate of
    one layer alive at once, attention scores materialised (fp32 attention is decomposed into MatMul/Softmax)."""
    d, v = config.decoder, config.vision
    act = bytes_per_value(precision)
    scores = 4  # softmax in float32
    n_img = v.num_patches
    vision = batch * (
        5 * (n_img + question) * (6 * v.hidden_size + 2 * v.intermediate_size) * act
        + v.num_heads * (4 * n_img**2 + (n_img + question) ** 2) * scores
        + 4 * n_img * 3 * v.hidden_size * act  # the connector's concatenated features
    )

    def decoder(tokens: int, keys: int) -> int:
        layer = tokens * (6 * d.hidden_size + 3 * d.intermediate_size) * act
        attention = d.num_heads * tokens * keys * scores
        return batch * (layer + attention + d.vocab_size * 4)

    return {
        "vision_encoder": vision,
        "decoder_prefill": decoder(prompt, prompt),
        "decoder_step": decoder(step, capacity),
        DECODER: decoder(max(prompt, step), capacity),  # a prefill through it attends over the whole buffer
    }


def stored_bytes(tensor: onnx.TensorProto) -> int:
    """Bytes of a tensor as ONNX stores it and a TensorRT engine holds it: sub-byte types packed (INT4: two values
    a byte, the tensor's last odd value in a byte of its own)."""
    try:
        bits = ir.DataType(tensor.data_type).bitwidth
    except (TypeError, ValueError):
        raise FusionError(f"weight {tensor.name!r}: ONNX type {tensor.data_type} has no fixed size") from None
    return (math.prod(tensor.dims) * bits + 7) // 8


def graph_protos(artifact) -> dict[str, onnx.GraphProto]:
    """The artifact's three graphs, read once for the plan: their protos alone (dims and types, not the weights)."""
    return {name: onnx.load(artifact.graph_path(name), load_external_data=False).graph
            for name in ("vision_encoder", "decoder_prefill", "decoder_step")}  # fmt: skip


def kv_write_ops(graph: onnx.GraphProto, num_layers: int) -> set[str]:
    """The op types of the nodes that produce a graph's `present_*` outputs (its KV-cache writes)."""
    presents = set(present_names(num_layers))
    return {node.op_type for node in graph.node if presents.intersection(node.output)}


def graph_weights(graph: onnx.GraphProto) -> dict[str, onnx.TensorProto]:
    """Every constant tensor of a graph by name (initializers and Constant nodes' values)."""
    tensors = {t.name: t for t in graph.initializer}
    for node in graph.node:
        if node.op_type == "Constant" and node.domain in ("", "ai.onnx"):
            tensors.update((node.output[0], a.t) for a in node.attribute if a.name == "value")
    return tensors


def engine_weights(by_dtype: dict[str, int]) -> EngineWeights:
    """An engine's weights from its bytes by ONNX type, the largest share first."""
    return EngineWeights(sum(by_dtype.values()), dict(sorted(by_dtype.items(), key=lambda kv: -kv[1])))


def _engine_weights(tensors: dict[str, onnx.TensorProto]) -> EngineWeights:
    by_dtype: dict[str, int] = {}
    for tensor in tensors.values():
        name = onnx.TensorProto.DataType.Name(tensor.data_type)
        by_dtype[name] = by_dtype.get(name, 0) + stored_bytes(tensor)
    return engine_weights(by_dtype)


def _weight_bytes(protos: dict[str, onnx.GraphProto], one_decoder: bool) -> tuple[dict[str, EngineWeights], int, int]:
    """Per engine, the weights its graphs hold (the decoder engine: the union of its two graphs'); the bytes of those
    both decoder graphs read (the same names: one tensor in the artifact), and the prefill's beyond them."""
    graphs = {name: graph_weights(graph) for name, graph in protos.items()}
    prefill, step = graphs["decoder_prefill"], graphs["decoder_step"]
    shared = sum(stored_bytes(t) for name, t in prefill.items() if name in step)
    interaction = sum(stored_bytes(t) for name, t in prefill.items() if name not in step)
    if one_decoder:
        graphs = {"vision_encoder": graphs["vision_encoder"], DECODER: {**step, **prefill}}
    return {name: _engine_weights(tensors) for name, tensors in graphs.items()}, shared, interaction


def one_decoder_engine(artifact) -> bool:
    """Whether the decoder builds as one engine: every artifact but one whose prefill graph holds the
    InteractionAttention plugin (it takes a fixed number of latent rows, fusion_export/decoder_merge.py)."""
    return INTERACTION_ATTENTION not in artifact.manifest["export"].get("plugins", [])


def _quantization(artifact) -> dict[str, Any] | None:
    """The weight quantization the graphs hold (their mode, read from their Q/DQ nodes by open_artifact), with the
    block size and method the manifest records for it."""
    if artifact.quantization is None:
        return None
    record = artifact.manifest.get("quantization") or {}
    return {"mode": artifact.quantization, **{k: record[k] for k in ("block_size", "method") if k in record}}


def _kv_cache(artifact) -> tuple[str, int]:
    """The KV cache's type ("int8", or the activations' "fp16" / "fp32") and bytes per value, from the decoder
    graphs' cache inputs as the manifest lists them (open_artifact checked them against the graphs)."""
    names = set(past_names(artifact.config.decoder.num_layers))
    dtypes = {entry["dtype"] for graph in ("decoder_prefill", "decoder_step")
              for entry in artifact.manifest["graphs"][graph]["inputs"] if entry["name"] in names}  # fmt: skip
    where = f"{artifact.folder}: the decoder graphs' KV cache inputs"
    if len(dtypes) != 1:
        raise FusionError(f"{where} have types {sorted(dtypes)}")
    dtype = dtypes.pop()
    word = "int8" if dtype == "INT8" else Precision.from_onnx_dtype(dtype, where).value
    return word, int(ir.DataType[dtype].itemsize)


def artifact_source(artifact) -> PlanSource:
    """What the plan reads of an artifact: its manifest and its graphs' protos (dims and types, no weights)."""
    one_decoder = one_decoder_engine(artifact)
    protos = graph_protos(artifact)
    engine_weights, decoder_weights, interaction_weights = _weight_bytes(protos, one_decoder)
    kv_dtype, kv_value_bytes = _kv_cache(artifact)
    write_ops = sorted({op for name in ("decoder_prefill", "decoder_step")
                        for op in kv_write_ops(protos[name], artifact.config.decoder.num_layers)})  # fmt: skip
    del protos
    return PlanSource(
        config=artifact.config,
        query_len=artifact.query_len,
        precision=artifact.precision.value,
        max_context=artifact.max_context,
        io=artifact.manifest["graphs"],
        engine_weights=engine_weights,
        decoder_weights=decoder_weights,
        interaction_weights=interaction_weights,
        kv_dtype=kv_dtype,
        kv_value_bytes=kv_value_bytes,
        kv_write_ops=write_ops,
        one_decoder=one_decoder,
        quantization=_quantization(artifact),
        embedding_bytes=math.prod(artifact.manifest["embeddings"]["shape"]) * bytes_per_value(artifact.precision.value),
    )


def plan_build(artifact, limits: BuildLimits, device: DeviceMemory | None = None) -> BuildPlan:
    """Profiles and memory for the artifact's three graphs; refuses limits the graphs or the device cannot hold."""
    return plan_source(artifact_source(artifact), limits, device)


def plan_source(source: PlanSource, limits: BuildLimits, device: DeviceMemory | None = None) -> BuildPlan:
    """The plan of what `source` describes (an artifact, or an export not yet made)."""
    config = source.config
    d = config.decoder
    positions = d.rope.max_position_embeddings
    shortest = config.vision.num_patches + source.query_len + 1
    notes = []

    fixed = source.max_context
    if fixed is not None and limits.max_context not in (None, fixed):
        raise FusionError(
            f"--max-context {limits.max_context}: the graphs were exported with a fixed KV capacity of {fixed} "
            "(re-export with --max-context to change it)"
        )
    capacity = fixed or limits.max_context or config.default_context
    if not shortest < capacity <= positions:
        raise FusionError(f"--max-context {capacity}: must be in {shortest + 1}..{positions}")
    max_prompt = limits.max_prompt or capacity - 1
    if not shortest <= max_prompt < capacity:
        raise FusionError(
            f"--max-prompt {max_prompt}: must be in {shortest}..{capacity - 1} (image tokens + latents + 1 .. "
            "the KV capacity minus one generated token)"
        )
    max_question = limits.max_question_tokens or min(config.max_question_tokens, DEFAULT_MAX_QUESTION_TOKENS)
    if not 1 <= max_question <= config.max_question_tokens:
        raise FusionError(f"--max-question-tokens {max_question}: must be in 1..{config.max_question_tokens}")
    if not 1 <= limits.max_batch <= MAX_BATCH:
        raise FusionError(f"--max-batch {limits.max_batch}: must be in 1..{MAX_BATCH}")
    if not 1 <= limits.opt_batch <= limits.max_batch:
        raise FusionError(f"--opt-batch {limits.opt_batch}: must be in 1..--max-batch ({limits.max_batch})")
    if not 1 <= limits.max_step_tokens <= 256:
        raise FusionError(f"--max-step-tokens {limits.max_step_tokens}: must be in 1..256 (the graphs' bound)")

    B = limits.max_batch
    ranges = {
        "batch": (1, limits.opt_batch, B),
        "instruct_len": (1, min(32, max_question), max_question),
        "seq": (shortest, min(shortest + TYPICAL_PROMPT_TEXT, max_prompt), max_prompt),
        "new_tokens": (1, 1, limits.max_step_tokens),
        "capacity": (capacity, capacity, capacity),
    }
    activations = _activations(config, source.precision, B, max_prompt, max_question,
                               limits.max_step_tokens, capacity)  # fmt: skip
    one_decoder = source.one_decoder
    io = source.io
    graphs = [_graph_plan(io, "vision_encoder", ranges, activations)]
    if one_decoder:
        side, window = math.isqrt(source.query_len), config.interaction.window_size
        ranges.update(tokens=(1, 1, max(max_prompt, limits.max_step_tokens)),
                      latents=(0, 0, source.query_len), context=(0, 0, (side * window) ** 2))  # fmt: skip
        inputs = merged_inputs(io["decoder_prefill"]["inputs"], io["decoder_step"]["inputs"])
        sources = ["decoder_prefill", "decoder_step"]
        graphs.append(GraphPlan(DECODER, " + ".join(io[g]["file"] for g in sources), _profile(inputs, ranges),
                                activations[DECODER], sources))  # fmt: skip
    else:
        graphs += [_graph_plan(io, name, ranges, activations) for name in ("decoder_prefill", "decoder_step")]
    engine_weights = source.engine_weights
    weights = sum(w.bytes for w in engine_weights.values())
    kv_dtype, kv_value_bytes, write_ops = source.kv_dtype, source.kv_value_bytes, source.kv_write_ops
    in_place = writes_in_place(write_ops, kv_dtype)
    buffers = kv_buffers(in_place)
    kv_per_column = 2 * d.num_layers * d.num_kv_heads * d.head_dim * kv_value_bytes * B * buffers

    def total(cap: int, prompt: int) -> dict[str, int]:
        acts = _activations(config, source.precision, B, prompt, max_question, limits.max_step_tokens, cap)
        memory = {
            "weights": weights,
            "kv_cache": kv_per_column * cap,
            "activations": shared_scratch_bytes(acts[g.name] for g in graphs),  # one block the contexts share
            "overhead": RUNTIME_OVERHEAD_BYTES,
        }
        memory["total"] = sum(memory.values())
        return memory

    memory = total(capacity, max_prompt)
    memory["host_embeddings"] = source.embedding_bytes  # not the engines': counted against shared memory only
    plan = BuildPlan(
        precision=source.precision,
        query_len=source.query_len,
        capacity=capacity,
        capacity_fixed_at_export=fixed is not None,
        limits={
            "max_batch": B,
            "opt_batch": limits.opt_batch,
            "max_prompt": max_prompt,
            "max_question_tokens": max_question,
            "max_step_tokens": limits.max_step_tokens,
            "max_context": capacity,
        },
        graphs=graphs,
        memory=memory,
        quantization=source.quantization,
        kv_cache_dtype=kv_dtype,
        weights=engine_weights,
        decoder_weights=source.decoder_weights,
        interaction_weights=source.interaction_weights,
        decoder_engines=1 if one_decoder else 2,
        kv_in_place=in_place,
        kv_buffers=buffers,
        kv_write_ops=write_ops,
        notes=notes,
    )
    if device is not None:
        host = source.embedding_bytes if device.shared else 0
        budget = device.usable_bytes - host
        plan.device = {"total_gb": device.total_gb, "reserved_gb": device.reserved_gb, "note": device.note,
                       "host_bytes": host}  # fmt: skip
        plan.largest_context = _largest_context(lambda c: total(c, c - 1)["total"], budget, shortest + 1, positions)
        if memory["total"] > budget:
            fits = plan.largest_context
            advice = (
                f"the largest KV capacity that fits is {fits} (--max-context {fits}"
                + (", which needs a re-export: the graphs fix it)" if fixed is not None else ")")
                if fits
                else "even the shortest context does not fit: the weights alone need "
                f"{(weights + RUNTIME_OVERHEAD_BYTES) / GB:.2f} GB"
            )
            held = f", and the runtime's embedding table {host / GB:.2f} GB on the host" if host else ""
            raise FusionError(
                f"--device-memory: the engines ({plan.planned_for()}) need about {memory['total'] / GB:.2f} GB at "
                f"capacity {capacity} (weights {weights / GB:.2f}, KV {memory['kv_cache'] / GB:.2f}, activations "
                f"{memory['activations'] / GB:.2f}, overhead {RUNTIME_OVERHEAD_BYTES / GB:.2f}{held}); {device.note} "
                f"leaves {budget / GB:.2f} GB; {advice}"
            )
    return plan


def _graph_plan(io: dict[str, dict[str, Any]], name: str, ranges, activations) -> GraphPlan:
    entry = io[name]
    return GraphPlan(name, entry["file"], _profile(entry["inputs"], ranges), activations[name], [name])


def _largest_context(need, budget: int, lo: int, hi: int) -> int | None:
    """The largest capacity c in lo..hi with need(c) <= budget (need grows with c), or None."""
    if need(lo) > budget:
        return None
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if need(mid) <= budget else (lo, mid - 1)
    return lo


def check_flavour_flags(
    flavour: str,
    offered: Sequence[str],
    has_timing_cache: bool,
    compute_capabilities: Sequence[str] = (),
    timing_cache: Path | None = None,
) -> None:
    """Refuse, before any work, the flags that `flavour` (as named in messages) would reject or silently ignore:
    compute capabilities it does not offer, a timing cache it does not keep."""
    unknown = [c for c in compute_capabilities if c not in offered]
    if unknown:
        choices = ", ".join(offered) or "none: this flavour builds for the GPU it runs on"
        raise FusionError(f"--compute-capability {','.join(unknown)}: {flavour} offers {choices}")
    if timing_cache is not None and not has_timing_cache:
        raise FusionError(
            f"--timing-cache {timing_cache}: {flavour} keeps no timing cache (its timing cache operations are "
            "no-ops); leave the flag out"
        )


def command_lines(
    plan: BuildPlan,
    artifact_dir: str,
    engine_dir: str,
    tool: str,
    strongly_typed: bool,
    compute_capabilities: Sequence[str] = (),
    timing_cache: str | None = None,
) -> list[str]:
    """trtexec (TensorRT) or tensorrt_rtx (TensorRT-RTX SDK; trtexec's flags) lines building the same engines;
    compute capabilities in tensorrt_rtx's form (SM86 -> 86), the timing cache as trtexec's --timingCacheFile."""

    def shapes(graph: GraphPlan, point: str) -> str:
        return ",".join(f"{name}:{'x'.join(map(str, p[point]))}" for name, p in graph.profile.items())

    lines = []
    for graph in plan.graphs:
        if len(graph.sources) > 1:  # no file in the artifact holds it: trtexec reads one ONNX file
            lines.append(f"# {graph.name}: {graph.onnx} merged in memory (fusion_export/decoder_merge.py), so only "
                         "`fusion-export build` builds it")  # fmt: skip
            continue
        parts = [tool, f"--onnx={artifact_dir}/{graph.onnx}", f"--saveEngine={engine_dir}/{graph.name}.engine"]
        if strongly_typed:
            parts.append("--stronglyTyped")
        if graph.profile:
            parts += [f"--{p}Shapes={shapes(graph, p)}" for p in ("min", "opt", "max")]
        if compute_capabilities:
            parts.append("--computeCapabilities=" + ",".join(c.removeprefix("SM") for c in compute_capabilities))
        if timing_cache:
            parts.append(f"--timingCacheFile={timing_cache}")
        lines.append(" ".join(parts))
    return lines
