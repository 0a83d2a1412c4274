"""The plan of an artifact before it exists: `build --dry-run --preset NAME | --model DIR` plans what exporting
(and quantizing) that checkpoint would give, without tracing a graph or reading a weight. A user learns whether
FUSION-LLaMA3.1-8B in INT4 fits an Orin Nano before spending an hour on its export; this machine learns it for
models it could not export at all (an 8B's fp16 export needs more memory than the model).

What the plan reads of an artifact (plan.PlanSource) is computed here from the config alone:
- each graph's inputs from its GraphSpec, built on the meta device (names, dtypes and symbolic dims as the
  exporter declares them; the tests hold them equal to real manifests);
- each engine's weights from the model's parameters, in the form each would be stored in (float in the
  activations' type; INT8 with one scale per output column; INT4 packed two a byte with one scale per block of
  input rows), by the rules the quantizers apply (engines/quantization: the LM head float under int8 and INT8
  under int4, the vision graph INT8 under int4). What this leaves out is what the graphs add beyond the
  parameters (index and shape constants, AWQ's unfolded 1/s vectors): the tests hold the total within 1% of the
  real artifacts' plans (tests/test_memory_plan.py; the full-size Phi in tests/test_fullsize_export.py).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from fusion_export.export import TENSOR_SCATTER_OPSET, resolve_max_context
from fusion_export.graphs.decoder import decoder_prefill_spec, decoder_step_spec
from fusion_export.graphs.spec import GraphSpec
from fusion_export.graphs.vision_encoder import vision_encoder_spec
from fusion_export.precision import Precision
from fusion_export.trt_rules.targets import TrtTarget
from reference_model import FusionConfig, FusionModel
from reference_model.errors import FusionError

from .plan import DECODER, EngineWeights, PlanSource

ONNX_TYPES = {torch.float32: "FLOAT", torch.float16: "FLOAT16", torch.bfloat16: "BFLOAT16", torch.int64: "INT64",
              torch.int32: "INT32", torch.bool: "BOOL", torch.int8: "INT8"}  # fmt: skip
QUANTIZATIONS = ("int8", "int8-weight-only", "int4")
VISION_PREFIXES = ("vision.", "mm_projector.", "aux_projector.")
STEP_PREFIXES = ("layers.", "norm.", "lm_head.")  # the decoder both phases read
PREFILL_ONLY_PREFIXES = ("interaction.",)


@dataclass(frozen=True)
class PlannedExport:
    """The export (and quantization) a plan is made for: `export` and `quantize`'s own choices and defaults."""

    precision: str = "fp16"  # the activations' type: fp32 or fp16
    quantization: str | None = None  # None, "int8" (W8A8), "int8-weight-only" or "int4"
    target: str = "trt-10.3"
    query_len: int | None = None  # None: the checkpoint's default
    max_context: int | None = None  # a capacity fixed at export (opset >= 24 fixes one anyway)
    kv_cache: str = "float"  # or "int8" (quantize --kv-cache int8)
    block_size: int = 128  # int4
    method: str = "awq"  # int4's --method (its memory is the same for every method)
    lm_head: str = "int8"  # int4's --lm-head
    vision: str = "int8"  # int4's --vision

    def describe(self) -> str:
        weights = self.quantization or f"{self.precision} weights"
        return f"export --dtype {self.precision} --trt-target {self.target}, {weights}, KV cache {self.kv_cache}"


def _flat(value) -> list:
    return [x for v in value for x in _flat(v)] if isinstance(value, (list, tuple)) else [value]


def spec_inputs(spec: GraphSpec) -> list[dict]:
    """A graph's inputs as the manifest lists them (name, ONNX type, dims: symbolic names where traced dynamic,
    except those declared fixed), from its spec alone."""
    examples = _flat(list(spec.example_inputs))
    dims = []
    for arg, example in zip(spec.dynamic_shapes.values(), spec.example_inputs):
        count = len(_flat([example]))
        if isinstance(arg, (list, tuple)):
            dims += list(arg)
        else:
            dims += [arg] * count
    inputs = []
    for name, tensor, dynamic in zip(spec.input_names, examples, dims):
        shape: list = list(tensor.shape)
        for axis, dim in (dynamic or {}).items():
            shape[axis] = dim.__name__
        for axis, size in spec.declared_dims.get(name, {}).items():
            shape[axis] = size
        inputs.append({"name": name, "dtype": ONNX_TYPES[tensor.dtype], "shape": shape})
    return inputs


def _linear_weights(model: FusionModel) -> set[str]:
    """The parameters the graphs read as MatMul weights (the quantizers' linear layers)."""
    return {f"{name}.weight" for name, module in model.named_modules() if isinstance(module, nn.Linear)}


def _stored(name: str, shape: torch.Size, form: str, act: int, block: int) -> dict[str, int]:
    """Bytes by ONNX type of one parameter stored in `form`: float, int8 (one scale per output column) or int4
    (packed two a byte, one scale per block of input rows per column)."""
    n = math.prod(shape)
    scale_type = "FLOAT16" if act == 2 else "FLOAT"
    if form == "int8":
        return {"INT8": n, scale_type: shape[0] * act}
    if form == "int4":
        if shape[1] % block:
            raise FusionError(f"{name}: {shape[1]} input rows are not a multiple of int4 blocks of {block}")
        return {"INT4": (n + 1) // 2, scale_type: (n // block) * act}
    return {scale_type: n * act}


def _form(name: str, linear: bool, graph_class: str, export: PlannedExport) -> str:
    if not linear or export.quantization is None:
        return "float"
    if export.quantization.startswith("int8"):
        return "float" if "lm_head" in name else "int8"  # quantize's default --exclude '*lm_head*'
    cls = "vision" if graph_class == "vision" else ("lm_head" if "lm_head" in name else "decoder")
    return {"vision": export.vision, "lm_head": export.lm_head, "decoder": "int4"}[cls]


def _weights(model: FusionModel, prefixes: tuple[str, ...], graph_class: str, export: PlannedExport) -> dict[str, int]:
    act = 2 if export.precision == "fp16" else 4
    linear = _linear_weights(model)
    out: dict[str, int] = {}
    for name, p in model.named_parameters():
        if name.startswith(prefixes):
            for dtype, n in _stored(name, p.shape, _form(name, name in linear, graph_class, export), act,
                                    export.block_size).items():  # fmt: skip
                out[dtype] = out.get(dtype, 0) + n
    return out


def _engine(by_dtype: dict[str, int]) -> EngineWeights:
    return EngineWeights(sum(by_dtype.values()), dict(sorted(by_dtype.items(), key=lambda kv: -kv[1])))


def _merge(*parts: dict[str, int]) -> dict[str, int]:
    out: dict[str, int] = {}
    for part in parts:
        for dtype, n in part.items():
            out[dtype] = out.get(dtype, 0) + n
    return out


def planned_source(config: FusionConfig, export: PlannedExport) -> PlanSource:
    """What the artifact `export` describes would show the planner, computed from `config`."""
    if export.quantization not in (None, *QUANTIZATIONS):
        raise FusionError(f"--precision {export.quantization}: choose fp32, fp16, {', '.join(QUANTIZATIONS)}")
    target = TrtTarget(export.target)
    opset = target.resolve_opset(None)
    if export.quantization == "int4" and opset < 21:
        raise FusionError(f"int4 needs an export at opset 21 or later (trt-10.15, trt-11), not {export.target}")
    query_len = config.check_query_len(export.query_len or config.default_query_len)
    capacity = resolve_max_context(export.max_context, config, opset, query_len)
    dtype = {Precision.fp32: torch.float32, Precision.fp16: torch.float16}[Precision(export.precision)]
    with torch.device("meta"):
        model = FusionModel(config).to(dtype)
        specs = [vision_encoder_spec(model, query_len), decoder_prefill_spec(model, query_len, capacity, False),
                 decoder_step_spec(model, capacity)]  # fmt: skip
    io = {spec.name: {"file": f"{spec.name}.onnx", "inputs": spec_inputs(spec)} for spec in specs}
    kv_int8 = export.kv_cache == "int8"
    if kv_int8:
        for graph in ("decoder_prefill", "decoder_step"):
            for entry in io[graph]["inputs"]:
                if entry["name"].startswith("past_key_values."):
                    entry["dtype"] = "INT8"
    vision = _weights(model, VISION_PREFIXES, "vision", export)
    step = _weights(model, STEP_PREFIXES, "decoder", export)
    interaction = _weights(model, PREFILL_ONLY_PREFIXES, "decoder", export)
    mode = {"int8": "int8", "int8-weight-only": "int8-weight-only", "int4": "int4-weight-only"}.get(
        export.quantization or ""
    )
    quantization = None
    if mode:
        int4 = {"block_size": export.block_size, "method": export.method} if export.quantization == "int4" else {}
        quantization = {"mode": mode, **int4}
    return PlanSource(
        config=config,
        query_len=query_len,
        precision=export.precision,
        max_context=capacity,  # None: chosen at build
        io=io,
        engine_weights={"vision_encoder": _engine(vision), DECODER: _engine(_merge(step, interaction))},
        decoder_weights=sum(step.values()),
        interaction_weights=sum(interaction.values()),
        kv_dtype="int8" if kv_int8 else export.precision,
        kv_value_bytes=1 if kv_int8 else (2 if export.precision == "fp16" else 4),
        kv_write_ops=["TensorScatter" if opset >= TENSOR_SCATTER_OPSET else "ScatterElements"],
        one_decoder=True,
        quantization=quantization,
        where=f"planned {export.describe()}",
    )
