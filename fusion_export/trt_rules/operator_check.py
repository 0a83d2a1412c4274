"""Static TensorRT-compatibility check of ONNX graphs against the parser's published operator support.

The TensorRT versions users deploy (10.3 on JetPack 6, 10.x, 11.x) cannot all be installed here, so every exported
graph is checked against `trt_operator_tables/<target>.json` (onnx-tensorrt `docs/operators.md` at the target's
release, see its README): opset range, op support, attribute
values, inputs that must be constants or absent, outputs that must be absent, dtypes, named dynamic dims, plus
this project's own rules (no `If`, no custom domains), the INT4 weight rules of each target's importer (the
tables' `int4_weights`), and the rules TensorRT's real parser taught us (tested against TensorRT-RTX,
`tests/test_trt_build.py`, `tests/test_int4_trt.py`). Errors are what the parser would reject; warnings are rules
this check cannot evaluate statically.
"""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import onnx
from onnx import helper

from reference_model.errors import FusionError

from ..output_files import OutputKind, write_json
from .targets import TrtTarget, blockwise_dequantize_opset

_DTYPE_NAMES = {v: k for k, v in onnx.TensorProto.DataType.items()}
# Ops that move INT8 data (an INT8 KV cache) without computing on it. The operator tables list no INT8 for them
# (only Q/DQ produce or read INT8 there), yet TensorRT-RTX 1.7.1's parser and builder take INT8 through each of
# them (tests/test_kv_int8.py): a warning, to be confirmed on the target. TensorScatter is not among them: RTX
# refuses an INT8 cache there ("cache has type Int8 but must have type Float, Half, or BFloat16").
INT8_DATA_MOVEMENT = {"ScatterElements", "ScatterND", "Shape"}
_INT8_UNLISTED = "INT8 data: not in the operator table's types, built by TensorRT-RTX 1.7.1; confirm on the target"


@dataclass
class Finding:
    graph: str
    severity: str  # "error" or "warning"
    where: str  # node name / op, or a graph input
    message: str


@dataclass
class CompatReport:
    target: str
    findings: list[Finding]
    ops: dict[str, dict[str, int]]  # graph -> op type -> count

    @property
    def errors(self) -> list[Finding]:
        return [f for f in self.findings if f.severity == "error"]

    @property
    def ok(self) -> bool:
        return not self.errors

    def to_json(self) -> dict[str, Any]:
        return {"target": self.target, "ok": self.ok, "findings": [asdict(f) for f in self.findings], "ops": self.ops}

    def table(self) -> str:
        lines = [f"TensorRT compatibility ({self.target}): {'OK' if self.ok else 'FAILED'}"]
        for graph, ops in self.ops.items():
            n_err = sum(1 for f in self.errors if f.graph == graph)
            n_warn = sum(1 for f in self.findings if f.graph == graph and f.severity == "warning")
            lines.append(
                f"  {graph}: {sum(ops.values())} nodes, {len(ops)} op types, {n_err} errors, {n_warn} warnings"
            )
        grouped: dict[tuple[str, str, str], list[str]] = {}  # one line per distinct message, with its count
        for f in self.findings:
            grouped.setdefault((f.severity, f.graph, f.message), []).append(f.where)
        for (severity, graph, message), wheres in grouped.items():
            more = f" (and {len(wheres) - 1} more)" if len(wheres) > 1 else ""
            lines.append(f"  {severity.upper():7s} {graph}: {wheres[0]}{more}: {message}")
        return "\n".join(lines)


class _GraphChecker:
    def __init__(self, name: str, model: onnx.ModelProto, target: TrtTarget):
        self.name, self.model, self.target = name, model, target
        self.table = target.table
        self.findings: list[Finding] = []
        graph = model.graph
        self.initializers = {t.name: t for t in graph.initializer}
        self.constants = {o: n for n in graph.node if n.op_type == "Constant" for o in n.output}
        self.consumers: dict[str, list[onnx.NodeProto]] = {}
        for node in graph.node:
            for value in node.input:
                self.consumers.setdefault(value, []).append(node)
        self.opset = next((i.version for i in model.opset_import if i.domain in ("", "ai.onnx")), 0)
        # ops the parser has built in outside ai.onnx (op_type -> domain), read like DequantizeLinear
        self.int4_custom_ops = {op: d for op, d in target.int4_rules["dequantize_ops"].items() if d}
        self.types: dict[str, onnx.TypeProto] = {}
        try:
            inferred = onnx.shape_inference.infer_shapes(model, strict_mode=False)
            for v in [*inferred.graph.value_info, *inferred.graph.input, *inferred.graph.output]:
                self.types[v.name] = v.type
        except Exception as e:  # inference failure only weakens the dtype checks; report it
            self.add("warning", "shape inference", f"could not infer types ({type(e).__name__}: {e})")
        for t in graph.initializer:
            self.types.setdefault(t.name, helper.make_tensor_type_proto(t.data_type, list(t.dims)))

    def add(self, severity: str, where: str, message: str) -> None:
        self.findings.append(Finding(self.name, severity, where, message))

    def dtype(self, value: str) -> str | None:
        t = self.types.get(value)
        if t is None or not t.HasField("tensor_type"):
            return None
        return _DTYPE_NAMES.get(t.tensor_type.elem_type)

    def rank(self, value: str) -> int | None:
        t = self.types.get(value)
        if t is None or not t.tensor_type.HasField("shape"):
            return None
        return len(t.tensor_type.shape.dim)

    def is_constant(self, value: str) -> bool:
        return value in self.initializers or value in self.constants

    def check(self) -> None:
        self.check_opsets()
        self.check_io()
        for i, node in enumerate(self.model.graph.node):
            self.check_node(node, node.name or f"#{i}")

    def check_opsets(self) -> None:
        for imp in self.model.opset_import:
            if imp.domain in ("", "ai.onnx"):
                lo, hi = self.table["opset_min"], self.table["opset_max"]
                if not lo <= imp.version <= hi:
                    self.add("error", "opset", f"ai.onnx opset {imp.version} outside {self.target.value}'s {lo}..{hi}")
            elif imp.domain not in self.int4_custom_ops.values():
                self.add(
                    "error", "opset", f"custom domain '{imp.domain}' (version {imp.version}) is not parsed by TensorRT"
                )

    def check_io(self) -> None:
        allowed = set(self.table["tensor_dtypes"]) - {"DOUBLE"}
        for kind, values in (("input", self.model.graph.input), ("output", self.model.graph.output)):
            for v in values:
                dtype = _DTYPE_NAMES.get(v.type.tensor_type.elem_type)
                if dtype not in allowed:
                    self.add("error", f"{kind} {v.name}", f"dtype {dtype} is not a TensorRT I/O type")
                if not v.type.tensor_type.HasField("shape"):
                    self.add("error", f"{kind} {v.name}", "unknown rank: TensorRT needs every I/O rank")
                    continue
                for axis, d in enumerate(v.type.tensor_type.shape.dim):
                    if not d.dim_param and d.dim_value <= 0:
                        self.add(
                            "error", f"{kind} {v.name}", f"dim {axis} is dynamic without a name (profiles need one)"
                        )

    def check_node(self, node: onnx.NodeProto, where: str) -> None:
        where = f"{where} ({node.op_type})"
        if self.int4_custom_ops.get(node.op_type) == node.domain:
            self.int4_dequantize_rules(node, where)
            return
        if node.domain not in ("", "ai.onnx"):
            self.add("error", where, f"op in domain '{node.domain}' is not a standard ONNX op")
            return
        if node.op_type == "If":
            self.add("error", where, "`If` is not allowed in TensorRT graphs (data-dependent control flow)")
        spec = self.table["ops"].get(node.op_type)
        if spec is None or not spec.get("supported", False):
            why = "; ".join(spec.get("restrictions", [])) if spec else "not in the parser's operator table"
            self.add("error", where, f"{node.op_type} is not supported by {self.target.value}: {why}")
            return
        self.check_dtypes(node, where, spec)
        self.check_attributes(node, where, spec)
        self.check_inputs(node, where, spec)
        for rule in spec.get("output_rules", []):
            i = rule["output_index"]
            if rule["rule"] == "must be absent" and i < len(node.output) and node.output[i]:
                self.add("error", where, f"output {i} ({rule['output_name']}) must be absent")
        self.kv_cache_update_rule(node, where)
        if node.op_type == "DequantizeLinear" and node.input and self.dtype(node.input[0]) == "INT4":
            self.int4_dequantize_rules(node, where)
        for attr in node.attribute:  # Loop / Scan bodies are parsed too
            for body in [attr.g] if attr.type == onnx.AttributeProto.GRAPH else list(attr.graphs):
                for k, inner in enumerate(body.node):
                    self.check_node(inner, f"{where}/{inner.name or f'#{k}'}")

    def check_dtypes(self, node: onnx.NodeProto, where: str, spec: dict[str, Any]) -> None:
        # the table lists one dtype set per op without saying which input it means; it describes the data
        # input, which is input 0 for every op this project emits
        dtypes = spec.get("dtypes") or []
        moves_int8 = node.op_type in INT8_DATA_MOVEMENT
        if dtypes and node.input and node.input[0]:
            dtype = self.dtype(node.input[0])
            if dtype == "INT8" and moves_int8:
                self.add("warning", where, _INT8_UNLISTED)
            elif dtype is not None and dtype not in dtypes:
                self.add("error", where, f"input dtype {dtype} not supported (allowed: {', '.join(dtypes)})")
        for out in node.output:
            dtype = self.dtype(out) if out else None
            if dtype in self.table.get("io_only_dtypes", []):
                self.add("error", where, f"output '{out}' is {dtype}, which TensorRT allows only as network I/O")
            quantized = dtype in self.table.get("quantized_only_dtypes", [])
            produced = node.op_type in ("QuantizeLinear", "Constant") or (dtype == "INT8" and moves_int8)
            if quantized and not produced:
                self.add("error", where, f"output '{out}' is {dtype}, which TensorRT produces only by QuantizeLinear")

    def check_attributes(self, node: onnx.NodeProto, where: str, spec: dict[str, Any]) -> None:
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        for rule in spec.get("attribute_rules", []):
            name = rule["attribute"]
            if name not in attrs:
                continue
            value = attrs[name]
            value = value.decode() if isinstance(value, bytes) else value
            if "allowed" in rule:
                if value not in rule["allowed"]:
                    self.add("error", where, f"attribute {name}={value!r} not supported (allowed: {rule['allowed']})")
            elif rule.get("rule") == "must be absent":
                self.add("error", where, f"attribute {name} is not supported")
            else:
                self.add("warning", where, f"attribute rule not checked statically: {name}: {rule.get('rule')}")

    def check_inputs(self, node: onnx.NodeProto, where: str, spec: dict[str, Any]) -> None:
        for rule in spec.get("input_rules", []):
            i, text = rule["input_index"], rule["rule"]
            if i >= len(node.input) or not node.input[i]:
                continue
            problem = self.input_problem(node.input[i], text)
            if problem is None:
                self.add("warning", where, f"input rule not checked statically: input {i}: {text}")
            elif problem:
                self.add("error", where, f"input {i} ({rule.get('input_name')}) {problem}")

    def input_problem(self, value: str, rule: str) -> str | None:
        """'' when `value` satisfies `rule`, a description when not, None for a rule this checker cannot read."""
        constant = self.constant_value(value)
        if rule == "must be absent":
            return "must be absent"
        if rule in ("must be initializer", "must be build-time constant"):
            return "" if self.is_constant(value) else f"must be a constant, got computed '{value}'"
        if rule == "must be zero initializer":
            zero = constant is not None and not constant.any()
            return "" if zero else f"must be a zero initializer ('{value}' is not)"
        if rule == "must be initializer evaluating to false":
            return "" if constant is not None and not constant.any() else "must be a constant false"
        if rule.startswith("rank must be"):
            allowed = [int(x) for x in rule.replace("rank must be", "").replace("if present", "").split("or")]
            rank = self.rank(value)
            return "" if rank is None or rank in allowed else f"has rank {rank}, needs {' or '.join(map(str, allowed))}"
        if rule == "dtype must be INT64":
            dtype = self.dtype(value)
            return "" if dtype in (None, "INT64") else f"is {dtype}, needs INT64"
        if rule == "value must be < 3840":
            if constant is None:
                return "must be a constant below 3840 (TopK K), got a computed value"
            return "" if (constant < 3840).all() else f"is {constant.tolist()}, must be < 3840"
        if rule == "shape must be static":
            t = self.types.get(value)
            dims = t.tensor_type.shape.dim if t is not None and t.tensor_type.HasField("shape") else None
            static = dims is not None and all(d.HasField("dim_value") for d in dims)
            return "" if static else "needs a static shape"
        return None

    def constant_value(self, value: str):
        if value in self.initializers:
            return onnx.numpy_helper.to_array(self.initializers[value])
        node = self.constants.get(value)
        if node is not None:
            for a in node.attribute:
                if a.name == "value":
                    return onnx.numpy_helper.to_array(a.t)
        return None

    def shape(self, value: str) -> list[int] | None:
        """The static shape of a constant (initializer or Constant output), read without its data."""
        if value in self.initializers:
            return list(self.initializers[value].dims)
        node = self.constants.get(value)
        tensor = next((a.t for a in node.attribute if a.name == "value"), None) if node is not None else None
        return None if tensor is None else list(tensor.dims)

    def int4_dequantize_rules(self, node: onnx.NodeProto, where: str) -> None:
        """INT4 weights as the target's importer reads them (the table's `int4_weights`, see its README): blockwise
        on a constant, one blocked axis, a scale of the weights' rank, the block inferred from the shapes (the parser
        never reads block_size, so it must divide the blocked dimension), symmetric, two values a byte."""
        rules, target = self.target.int4_rules, self.target.value

        def error(message: str) -> None:
            self.add("error", where, message)

        def warning(message: str) -> None:
            self.add("warning", where, message)

        custom = node.domain not in ("", "ai.onnx")
        weights, scale = node.input[0], node.input[1] if len(node.input) > 1 else ""
        if custom and self.dtype(weights) != "INT4":
            return error(f"{node.op_type} reads INT4 weights; '{weights}' is {self.dtype(weights)}")
        dims, scale_dims = self.shape(weights), self.shape(scale) if scale else None
        named = f"INT4 weights '{weights}'"
        if dims is None:
            return error(f"INT4 '{weights}' is computed: {target} dequantizes INT4 only as constant weights")
        if len(dims) != rules["weight_rank"]:
            return error(f"{named} have rank {len(dims)}: {target} reads rank-{rules['weight_rank']} INT4 weights only")
        if scale_dims is None:
            return error(f"the scale '{scale or '(none)'}' of {named} must be a constant")
        if len(scale_dims) != len(dims):
            return error(
                f"the scale '{scale}' of {named} has rank {len(scale_dims)}: INT4 needs a blockwise scale of the "
                f"weights' rank {len(dims)} (per-tensor or per-channel INT4 is not the form this project writes)"
            )
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        axis = int(attrs.get("axis", 1)) % len(dims)
        blocked = [i for i, (d, s) in enumerate(zip(dims, scale_dims, strict=True)) if d != s]
        if blocked != [axis] or axis - len(dims) not in rules["blocked_axes"]:
            return error(
                f"the scale '{scale}' {scale_dims} of {named} {dims}: exactly one axis may be blocked, the "
                f"quantization axis ({axis}), and it must be one of the last two"
            )
        size, blocks, block = dims[axis], scale_dims[axis], int(attrs.get("block_size", 0))
        first = blockwise_dequantize_opset()
        if block and not custom and self.opset < first:
            error(f"{named}: block_size is a DequantizeLinear attribute from opset {first}; the graph is {self.opset}")
        if not block and not custom:
            return error(f"{named} have a scale of their rank but no block_size")
        block = block or size // max(blocks, 1)
        if size % block or size // block != blocks:
            error(
                f"{named}: block_size {block} over dimension {axis} ({size}) with {blocks} scale rows; {target}'s "
                f"parser ignores block_size and reads blocks of {size}/{blocks}, so the block must divide the "
                "dimension into exactly that many"
            )
        if rules["even"] == "last dimension" and dims[-1] % 2:
            error(
                f"{named} have an odd last dimension ({dims[-1]}): {target}'s parser packs two values a byte along it"
            )
        elif math.prod(dims) % 2:
            error(f"{named} have an odd element count: {target}'s parser packs two values a byte")
        elif dims[-1] % 2:
            warning(
                f"{named} have an odd last dimension ({dims[-1]}): parsers since 10.6 and TensorRT-RTX 1.7.1 take "
                "it, 10.1's refused it; confirm on the target"
            )
        if block not in rules["documented_block_sizes"]:
            warning(  # the node is named beside it: one text for every layer, so the report folds them
                f"INT4 blocks of {block}: TensorRT documents blocks of {rules['documented_block_sizes']} "
                "(TensorRT-RTX 1.7.1 builds it without a GPU); confirm on the target"
            )
        if custom and len(node.input) > 2 and node.input[2]:  # DequantizeLinear's comes from the table's input_rules
            problem = self.input_problem(node.input[2], "must be zero initializer")
            if problem:
                error(f"input 2 (x_zero_point) {problem}")
        self.int4_activation_dtype_rule(node, where, scale)

    def int4_activation_dtype_rule(self, node: onnx.NodeProto, where: str, scale: str) -> None:
        """The dequantized weights take the scale's dtype, and a strongly typed MatMul/Gemm multiplies operands of
        one type only (TensorRT-RTX 1.7.1: "IMatrixMultiplyLayer must have same input types")."""
        output_dtype = next((a.i for a in node.attribute if a.name == "output_dtype"), 0)
        dequantized = _DTYPE_NAMES.get(output_dtype) if output_dtype else self.dtype(scale)
        for consumer in self.consumers.get(node.output[0], []):
            if consumer.op_type not in ("MatMul", "Gemm"):
                continue
            for other in consumer.input[:2]:
                dtype = self.dtype(other) if other != node.output[0] else None
                if None not in (dtype, dequantized) and dtype != dequantized:
                    self.add(
                        "error",
                        where,
                        f"the scale '{scale}' is {dequantized} and the activations '{other}' into {consumer.op_type} "
                        f"'{consumer.name}' are {dtype}: write the scale in the activation dtype (a strongly typed "
                        "MatMul takes one type)",
                    )

    def kv_cache_update_rule(self, node: onnx.NodeProto, where: str) -> None:
        """Learned from TensorRT's own parser (TensorRT-RTX 1.7, the onnx-tensorrt importer): TensorScatter maps to
        the KV-cache update layer, whose cache "must be a network input and have a static sequence length
        dimension" (KVCacheUpdate operator page); a symbolic capacity is rejected at parse time, before any
        optimization profile could pin it."""
        if node.op_type != "TensorScatter" or not node.input:
            return
        inputs = {v.name: v for v in self.model.graph.input}
        cache = inputs.get(node.input[0])
        if cache is None:
            self.add("error", where, "TensorRT's KV-cache update needs the cache to be a network input")
            return
        dims = cache.type.tensor_type.shape.dim
        if len(dims) < 2 or not dims[-2].HasField("dim_value"):
            self.add(
                "error",
                where,
                f"The KV cache tensor must have a static sequence length dimension (TensorRT's parser): "
                f"'{cache.name}' has '{dims[-2].dim_param if len(dims) >= 2 else '?'}'; export with --max-context N",
            )


class GraphReadError(FusionError):
    """A file that is not a readable ONNX graph (the check cannot say anything about it)."""


def read_graph(path: Path) -> onnx.ModelProto:
    """The graph of an .onnx file (weights left on disk), refused clearly when it is empty, corrupt or no graph."""
    try:
        size = path.stat().st_size
        model = onnx.load(path, load_external_data=False)
    except OSError as e:
        raise GraphReadError(f"{path}: cannot read ({e.strerror})") from None
    except Exception as e:  # protobuf raises DecodeError and friends for a corrupt file
        raise GraphReadError(f"{path}: not an ONNX model ({type(e).__name__}: {e})") from None
    if size == 0 or not model.graph.node:
        raise GraphReadError(f"{path}: not an ONNX model ({size} bytes, no graph nodes)")
    try:
        onnx.checker.check_model(str(path))  # by path: external data is resolved beside the file, not loaded
    except onnx.checker.ValidationError as e:
        first = str(e).strip().splitlines()[0]
        node = re.search(r"Name: (\S+) OpType: (\S+)", str(e))  # the checker's context line names the node
        at = f" at node '{node[1]}' ({node[2]})" if node else ""
        raise GraphReadError(f"{path}: not a valid ONNX model ({first}{at})") from None
    return model


def _inline_plugin_functions(model: onnx.ModelProto) -> tuple[onnx.ModelProto, list[str]]:
    """Plugin nodes (our domain, with a model-local function) as TensorRT's parser reads them when the plugin is
    not registered: through their decomposition, inlined (TensorRT-RTX parses and builds exactly that)."""
    if not model.functions:
        return model, []
    local = {(f.domain, f.name) for f in model.functions}
    plugins = sorted({n.op_type for n in model.graph.node if (n.domain, n.op_type) in local})
    from onnx import inliner

    inlined = inliner.inline_local_functions(model)
    used = {n.domain for n in inlined.graph.node}
    kept = [imp for imp in inlined.opset_import if imp.domain in ("", "ai.onnx") or imp.domain in used]
    del inlined.opset_import[:]
    inlined.opset_import.extend(kept)
    return inlined, plugins


def check_graph(path: Path, target: TrtTarget, name: str | None = None) -> tuple[list[Finding], dict[str, int]]:
    return check_model(read_graph(path), target, name or path.stem)


def check_model(model: onnx.ModelProto, target: TrtTarget, name: str) -> tuple[list[Finding], dict[str, int]]:
    """The check of a graph in memory (weights may stay external: only shapes and small constants are read), for
    a graph that is not on disk yet or that the ONNX checker would stop before this check says why."""
    model, plugins = _inline_plugin_functions(model)
    checker = _GraphChecker(name, model, target)
    for plugin in plugins:
        checker.add("warning", plugin, "plugin node: checked through its local-function decomposition, which "
                    "TensorRT inlines unless the plugin is registered")  # fmt: skip
    checker.check()
    ops: dict[str, int] = {}
    for node in model.graph.node:
        ops[node.op_type] = ops.get(node.op_type, 0) + 1
    return checker.findings, dict(sorted(ops.items()))


def check_graphs(paths: dict[str, Path], target: TrtTarget) -> CompatReport:
    findings, ops = [], {}
    for name, path in paths.items():
        f, o = check_graph(path, target, name)
        findings.extend(f)
        ops[name] = o
    if {"decoder_prefill", "decoder_step"} <= paths.keys():
        findings.extend(check_decoder_merge(paths["decoder_prefill"], paths["decoder_step"]))
    return CompatReport(target=target.value, findings=findings, ops=ops)


def check_decoder_merge(prefill: Path, step: Path) -> list[Finding]:
    """The build makes one decoder engine of the two decoder graphs (fusion_export/decoder_merge.py): they must merge.
    The merged graph holds their nodes, checked above, and binds empty tensors at a decode step, which TensorRT
    supports on every target (its developer guide, "Working with Empty Tensors"; an empty binding still needs an
    address, engines/tensorrt/runtime.py). `--plugins on` graphs keep two decoder engines: said as a warning."""
    from ..decoder_merge import MergeError, merge_decoder
    from ..plugin_ops.onnx_forms import DOMAIN, INTERACTION_ATTENTION

    p, s = (onnx.load(path, load_external_data=False) for path in (prefill, step))
    if any(n.domain == DOMAIN and n.op_type == INTERACTION_ATTENTION for n in p.graph.node):
        return [Finding("decoder_prefill", "warning", "InteractionAttention",
                        "--plugins on: the plugin takes a fixed number of latent rows, so the build makes a prefill "
                        "and a step engine, each holding the decoder's weights")]  # fmt: skip
    try:
        merge_decoder(p, s)
    except MergeError as e:
        return [Finding("decoder_prefill", "error", "decoder",
                        f"the prefill and step graphs do not merge into one decoder graph: {e}")]  # fmt: skip
    return []


def save_report(report: CompatReport, path: Path) -> None:
    write_json(path, OutputKind.trt_report, report.to_json())
