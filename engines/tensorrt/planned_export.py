"""The plan of an artifact before it exists: `build --dry-run --preset NAME | --model DIR` plans what exporting
(and quantizing) that checkpoint would give, without tracing a graph or reading a weight. A user learns whether
FUSION-LLaMA3.1-8B in INT4 fits an Orin Nano before spending an hour on its export; this machine learns it for
models it could not export at all (an 8B's fp16 export needs more memory than the model).

What the plan reads of an artifact (plan.PlanSource) is computed here from the config alone:
- each graph's inputs from its GraphSpec, built on the meta device (names, dtypes and symbolic dims as the
  exporter declares them; the tests hold them equal to real manifests);
- each engine's weights from the model's parameters, in the form each would be stored in (float in the
  activations' type; INT8 with one scale per output column; INT4 packed two a byte with one scale per block of
  input rows), by the quantizers' own rules and defaults (engines/quantization: the LM head float under int8 and
  INT8 under int4, the vision graph INT8 under int4). What this leaves out is what the graphs add beyond the
  parameters (index and shape constants, AWQ's unfolded 1/s vectors, a few kB): the tests hold the plans to the
  real artifacts' (tests/test_memory_plan.py, tests/test_llama_family.py; the full-size Phi in
  tests/test_fullsize_export.py).
Exports with `--plugins on` are not planned here (their two decoder engines each hold the decoder): plan the
artifact itself.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from fusion_export.export import TENSOR_SCATTER_OPSET, resolve_max_context
from fusion_export.graphs.decoder import decoder_prefill_spec, decoder_step_spec
from fusion_export.graphs.spec import GraphSpec
from fusion_export.graphs.vision_encoder import vision_encoder_spec
from fusion_export.precision import Precision
from fusion_export.trt_rules.targets import TrtTarget, check_int4
from reference_model import FusionConfig, FusionModel
from reference_model.errors import FusionError

from ..quantization.int4 import DEFAULT_BLOCK_SIZE, check_block_size
from ..quantization.int4_graph import layer_class
from ..quantization.qdq import DEFAULT_EXCLUDE, excluded
from ..quantization.quantize import INT4_DEFAULT_FORMS
from .plan import DECODER, PlanSource, bytes_per_value, engine_weights

ONNX_TYPES = {torch.float32: "FLOAT", torch.float16: "FLOAT16", torch.int64: "INT64", torch.int8: "INT8"}
TORCH_DTYPES = {Precision.fp32: torch.float32, Precision.fp16: torch.float16}
QUANTIZATIONS = ("int8", "int8-weight-only", "int4")
MODES = {"int8": "int8", "int8-weight-only": "int8-weight-only", "int4": "int4-weight-only"}  # the manifest's
# the parameters each graph reads: the vision encoder's, those both decoder graphs read, the prefill's alone
VISION_PREFIXES = ("vision.", "mm_projector.", "aux_projector.")
STEP_PREFIXES = ("layers.", "norm.", "lm_head.")
PREFILL_ONLY_PREFIXES = ("interaction.",)


@dataclass(frozen=True)
class PlannedExport:
    """The export (and quantization) a plan is made for, with `export`'s and `quantize`'s defaults."""

    precision: str = "fp32"  # export --dtype: the activations' type
    quantization: str | None = None  # quantize --precision int8 [--weight-only] / int4
    target: str = "trt-10.3"
    opset: int | None = None  # export --opset (None: the target's)
    query_len: int | None = None  # None: the checkpoint's default
    max_context: int | None = None  # export --max-context (opset >= 24 fixes one anyway)
    kv_cache: str = "float"  # quantize --kv-cache
    block_size: int = DEFAULT_BLOCK_SIZE  # int4
    method: str = "awq"  # int4's --method (the memory is the same for every method)
    forms: tuple[tuple[str, str], ...] = tuple(INT4_DEFAULT_FORMS.items())  # int4: layer class -> int4/int8/float

    def describe(self) -> str:
        quantized = f", quantize --precision {self.quantization}" if self.quantization else ""
        kv = ", --kv-cache int8" if self.kv_cache == "int8" else ""
        opset = f" --opset {self.opset}" if self.opset else ""
        return f"export --dtype {self.precision} --trt-target {self.target}{opset}{quantized}{kv}"


def _flat(value) -> list:
    return [x for v in value for x in _flat(v)] if isinstance(value, (list, tuple)) else [value]


def spec_inputs(spec: GraphSpec) -> list[dict]:
    """A graph's inputs as the manifest lists them (name, ONNX type, dims: symbolic names where traced dynamic,
    except those declared fixed), from its spec alone."""
    dims = []
    for arg, example in zip(spec.dynamic_shapes.values(), spec.example_inputs):
        dims += list(arg) if isinstance(arg, (list, tuple)) else [arg] * len(_flat([example]))
    inputs = []
    for name, tensor, dynamic in zip(spec.input_names, _flat(list(spec.example_inputs)), dims):
        shape: list = list(tensor.shape)
        for axis, dim in (dynamic or {}).items():
            shape[axis] = dim.__name__
        for axis, size in spec.declared_dims.get(name, {}).items():
            shape[axis] = size
        inputs.append({"name": name, "dtype": ONNX_TYPES[tensor.dtype], "shape": shape})
    return inputs


def _form(name: str, linear: bool, graph: str, export: PlannedExport) -> str:
    """How a parameter is stored: float, or the quantizer's int8 / int4 for a linear layer's weight."""
    if not linear or export.quantization is None:
        return "float"
    if export.quantization.startswith("int8"):
        return "float" if excluded(name, DEFAULT_EXCLUDE) else "int8"
    return dict(export.forms)[layer_class(graph, name)]


def _stored(name: str, shape: torch.Size, form: str, act: int, block: int) -> dict[str, int]:
    """Bytes by ONNX type of one parameter stored in `form`: float in the activations' type, int8 (one scale per
    output column) or int4 (packed two a byte, one scale per block of input rows per column)."""
    n, scale_type = shape.numel(), "FLOAT16" if act == 2 else "FLOAT"
    if form == "int8":
        return {"INT8": n, scale_type: shape[0] * act}
    if form == "int4":
        check_block_size(name, (shape[1], shape[0]), block)  # ONNX holds the weight as [in, out]
        return {"INT4": (n + 1) // 2, scale_type: (n // block) * act}
    return {scale_type: n * act}


def _weights(model: FusionModel, prefixes: tuple[str, ...], graph: str, export: PlannedExport) -> dict[str, int]:
    act = bytes_per_value(export.precision)
    linear = {f"{name}.weight" for name, module in model.named_modules() if isinstance(module, nn.Linear)}
    out: dict[str, int] = {}
    for name, p in model.named_parameters():
        if name.startswith(prefixes):
            form = _form(name, name in linear, graph, export)
            for dtype, n in _stored(name, p.shape, form, act, export.block_size).items():
                out[dtype] = out.get(dtype, 0) + n
    return out


def planned_source(config: FusionConfig, export: PlannedExport) -> PlanSource:
    """What the artifact `export` describes would show the planner, computed from `config`."""
    if export.quantization not in (None, *QUANTIZATIONS):
        raise FusionError(f"quantization {export.quantization!r}: choose one of {', '.join(QUANTIZATIONS)}")
    if export.kv_cache not in ("float", "int8"):
        raise FusionError(f"--kv-cache {export.kv_cache!r}: choose float or int8")
    precision = Precision(export.precision)
    target = TrtTarget(export.target)
    opset = target.resolve_opset(export.opset)
    if export.quantization == "int4":
        check_int4(target, opset)
    query_len = config.check_query_len(export.query_len or config.default_query_len)
    capacity = resolve_max_context(export.max_context, config, opset, query_len)
    with torch.device("meta"):
        model = FusionModel(config).to(TORCH_DTYPES[precision])
        specs = [vision_encoder_spec(model, query_len), decoder_prefill_spec(model, query_len, capacity, False),
                 decoder_step_spec(model, capacity)]  # fmt: skip
    io = {spec.name: {"file": f"{spec.name}.onnx", "inputs": spec_inputs(spec)} for spec in specs}
    kv_int8 = export.kv_cache == "int8"
    if kv_int8:  # quantize --kv-cache int8 retypes the cache inputs and writes them with ScatterND
        for graph in ("decoder_prefill", "decoder_step"):
            for entry in io[graph]["inputs"]:
                if entry["name"].startswith("past_key_values."):
                    entry["dtype"] = "INT8"
    vision = _weights(model, VISION_PREFIXES, "vision_encoder", export)
    step = _weights(model, STEP_PREFIXES, "decoder_step", export)
    interaction = _weights(model, PREFILL_ONLY_PREFIXES, "decoder_prefill", export)
    decoder = {t: step.get(t, 0) + interaction.get(t, 0) for t in {*step, *interaction}}
    quantization = None
    if export.quantization:
        int4 = {"block_size": export.block_size, "method": export.method} if export.quantization == "int4" else {}
        quantization = {"mode": MODES[export.quantization], **int4}
    # the ops that write the cache, as the graphs hold them: the exporter's (TensorScatter at opset >= 24, else
    # ScatterElements in the step and ScatterND in the prefill); the INT8 cache rewrite turns TensorScatter into
    # ScatterND (engines/quantization/kv_cache.py)
    if opset >= TENSOR_SCATTER_OPSET:
        write_ops = ["ScatterND" if kv_int8 else "TensorScatter"]
    else:
        write_ops = ["ScatterElements", "ScatterND"]
    return PlanSource(
        config=config,
        query_len=query_len,
        precision=precision.value,
        max_context=capacity,  # None: chosen at build
        io=io,
        engine_weights={"vision_encoder": engine_weights(vision), DECODER: engine_weights(decoder)},
        decoder_weights=sum(step.values()),
        interaction_weights=sum(interaction.values()),
        kv_dtype="int8" if kv_int8 else precision.value,
        kv_value_bytes=1 if kv_int8 else bytes_per_value(precision.value),
        kv_write_ops=write_ops,
        one_decoder=True,
        quantization=quantization,
        embedding_bytes=config.decoder.vocab_size * config.decoder.hidden_size * bytes_per_value(precision.value),
    )
