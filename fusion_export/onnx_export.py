"""Tracing GraphSpecs to ONNX and writing them with weights shared on disk.

Graphs of one weights group (decoder prefill and step) reference one external data file: each parameter is
written once, the first time a graph of the group needs it, and every graph points at the same bytes. Tensors
are streamed one at a time, so a full-size model is never serialised into memory.
"""

from __future__ import annotations

import ast
import hashlib
import logging
import re
import warnings
from collections.abc import Callable
from pathlib import Path

import onnx
import onnx_ir as ir
import torch

from .decoder_merge import SCOPE_KEY
from .graphs import attention, interaction, kv_write, rms_norm, window_pool
from .graphs.spec import GraphSpec

REGION_KEY = "fusion_export.region"
# SCOPE_KEY: the decoder layer, interaction layer or final norm a node computes, how decoder_merge finds each
# interaction layer in the prefill graph
_SCOPE = re.compile(r"model\.(layers|interaction)\.\d+|model\.norm")
REGION_OPS = ("kv_write", "decode_attention", "scaled_dot_product_attention")
INLINE_BYTES = 1024  # smaller constants stay inside the .onnx file
_SMALL_ALIGN, _LARGE_ALIGN, _LARGE = 64, 65536, 1 << 20  # large tensors page-aligned so runtimes can mmap them


def trace(spec: GraphSpec, opset: int, plugins: bool = False) -> ir.Model:
    """torch.export + ONNX translation of one graph, lightly optimised: shape arithmetic folded, weights kept
    under their parameter names (MatMul weights stored pre-transposed as `<name>.T`), defaults dropped."""
    import onnxscript.optimizer

    quiet = logging.getLogger("torch.onnx")  # "torchvision is not installed" notices on every export
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    switches = [m for m in spec.module.modules() if hasattr(m, "as_plugin")]  # modules with a plugin form
    for module in switches:
        module.as_plugin = plugins
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            program = torch.onnx.export(
                spec.module.eval(),
                spec.example_inputs,
                dynamo=True,
                opset_version=opset,
                input_names=spec.input_names,
                output_names=spec.output_names,
                dynamic_shapes=spec.dynamic_shapes,
                custom_translation_table={
                    **kv_write.translation_table(opset),
                    **attention.translation_table(opset, plugins),
                    **rms_norm.translation_table(opset),
                    **window_pool.translation_table(),
                    **interaction.translation_table(),
                },
                optimize=False,
                verbose=False,
            )
    finally:
        quiet.setLevel(level)
        for module in switches:
            module.as_plugin = False
    model = program.model
    _pretranspose_weights(model)
    onnxscript.optimizer.optimize_ir(
        model,
        num_iterations=1,
        onnx_shape_inference=False,
        input_size_limit=INLINE_BYTES,
        output_size_limit=INLINE_BYTES,
    )
    for node in model.graph:
        region, scope = attention_region(node.metadata_props), layer_scope(node.metadata_props)
        node.metadata_props.clear()  # per-node stack traces would be most of the file's size
        if region:
            node.metadata_props[REGION_KEY] = region
        if scope:
            node.metadata_props[SCOPE_KEY] = scope
        _drop_default_attributes(node, opset)
    _declare_dims(model, spec.declared_dims)
    model.graph.name = spec.name
    _attach_plugin_functions(model, opset)
    return model


def _declare_dims(model: ir.Model, declared: dict[str, dict[int, int]]) -> None:
    """Fix the declared sizes in the graph's input shapes (the nodes read them from the data)."""
    for value in model.graph.inputs:
        if value.name in declared and value.shape is not None:
            dims = list(value.shape)
            for axis, size in declared[value.name].items():
                dims[axis] = size
            value.shape = ir.Shape(dims)


def attention_region(metadata: dict[str, str]) -> str | None:
    """`<module scope>/<kind>` for a node of an attention module's forward (the exporter's own metadata names
    the module and the torch op): `kv_write`, `decode_attention` or `scaled_dot_product_attention` for those
    ops, `forward` for the module's other ops (reshapes, RoPE); None outside attention modules and inside their
    projections. Kept in the graph so a runtime finds each layer's attention as one region
    (engines/onnxruntime/attention.py) without matching op patterns."""
    target = re.search(r"target=torch\.ops\.[\w]+\.(\w+)\.", metadata.get("pkg.torch.onnx.fx_node", ""))
    scopes = _name_scopes(metadata)
    if target is None or scopes is None or len(scopes) < 2:
        return None
    if target.group(1) in REGION_OPS:
        return f"{scopes[-2]}/{target.group(1)}"
    return f"{scopes[-2]}/forward" if scopes[-2].endswith(".self_attn") else None


def layer_scope(metadata: dict[str, str]) -> str | None:
    """The outermost decoder layer, interaction layer or final norm module whose forward made the node, or None."""
    return next((s for s in _name_scopes(metadata) or [] if isinstance(s, str) and _SCOPE.fullmatch(s)), None)


def _name_scopes(metadata: dict[str, str]) -> list | None:
    """The module scopes the exporter records for a node (outermost first), or None where it records none."""
    try:
        scopes = ast.literal_eval(metadata.get("pkg.torch.onnx.name_scopes", ""))
    except (ValueError, SyntaxError):
        return None
    return scopes if isinstance(scopes, list) else None


def _attach_plugin_functions(model: ir.Model, opset: int) -> None:
    """Every plugin node gets its local function (the standard-op decomposition) and its domain's opset."""
    from fusion_export.plugin_ops.onnx_forms import DOMAIN, PLUGIN_FUNCTIONS

    for name in plugin_ops(model):
        function = ir.serde.deserialize_function(PLUGIN_FUNCTIONS[name](opset))
        model.functions[function.identifier()] = function
        model.opset_imports[DOMAIN] = 1


def plugin_ops(model: ir.Model) -> list[str]:
    """The plugin ops a traced graph holds (its nodes in the plugin domain), sorted."""
    from fusion_export.plugin_ops.onnx_forms import DOMAIN

    return sorted({node.op_type for node in model.graph if node.domain == DOMAIN})


def _gemm_as_matmul(graph: ir.Graph) -> None:
    """`Gemm(a, weight, transB=1)` (a 2-D `linear`, e.g. the LM head on the last token) -> `MatMul(a,
    Transpose(weight))`, which the pass below stores pre-transposed: runtimes then run it as the GEMV every other
    projection is (ONNX Runtime's transposed Gemm streamed the 66 MB `small` LM head at 20 GB/s, its MatMul at 27)."""
    for node in list(graph):
        if node.op_type != "Gemm" or node.domain not in ("", "ai.onnx") or len(node.inputs) != 2:
            continue
        attrs = {name: attr.value for name, attr in node.attributes.items()}
        if attrs.get("transA", 0) or attrs.get("transB", 0) != 1 or attrs.get("alpha", 1.0) != 1.0:
            continue
        a, weight = node.inputs
        transpose = ir.node("Transpose", [weight], attributes={"perm": [1, 0]})
        matmul = ir.node("MatMul", [a, transpose.outputs[0]])
        graph.insert_before(node, [transpose, matmul])
        old = node.outputs[0]
        name, shape, dtype = old.name, old.shape, old.type
        ir.convenience.replace_all_uses_with(old, matmul.outputs[0], replace_graph_outputs=True)
        graph.remove(node, safe=True)
        matmul.outputs[0].name, matmul.outputs[0].shape, matmul.outputs[0].type = name, shape, dtype


def _pretranspose_weights(model: ir.Model) -> None:
    """Replace `Transpose(weight)` by a stored `<weight>.T` initializer ([in, out], what MatMul reads).

    Left to the optimizer, the folded copies would get anonymous `val_N` names (which collide between graphs);
    left in the graph, every runtime session would transpose its own copy at load. The transposed tensor is
    produced lazily, one at a time, when the weights are written.
    """
    graph = model.graph
    _gemm_as_matmul(graph)
    made: dict[str, ir.Value] = {}
    for node in list(graph):
        if node.op_type != "Transpose" or node.domain not in ("", "ai.onnx"):
            continue
        source = node.inputs[0]
        tensor = source.const_value if source is not None else None
        raw = getattr(tensor, "raw", None)
        perm = node.attributes.get("perm")
        if source.name not in graph.initializers or not isinstance(raw, torch.Tensor) or raw.dim() != 2:
            continue
        if perm is not None and list(perm.value) != [1, 0]:
            continue
        if source.name not in made:
            view = raw.detach().t()
            lazy = ir.LazyTensor(
                lambda v=view: ir.tensor(v.contiguous().numpy()),
                dtype=tensor.dtype,
                shape=ir.Shape(list(view.shape)),
                name=f"{source.name}.T",
            )
            lazy.meta[_SOURCE_KEY] = ("transposed", *_identity(tensor))
            value = ir.Value(name=lazy.name, shape=lazy.shape, type=ir.TensorType(tensor.dtype), const_value=lazy)
            graph.register_initializer(value)
            made[source.name] = value
        ir.convenience.replace_all_uses_with(node.outputs[0], made[source.name], replace_graph_outputs=True)
        graph.remove(node, safe=True)
        if not source.uses():
            graph.initializers.pop(source.name)


def _drop_default_attributes(node: ir.Node, opset: int) -> None:
    """Remove attributes set to their schema default: same semantics, and parsers that reject an attribute
    outright (TensorRT's Attention: `softcap`, `qk_matmul_output_mode`) never see them."""
    if node.domain not in ("", "ai.onnx"):
        return
    try:
        schema = onnx.defs.get_schema(node.op_type, opset, node.domain)
    except onnx.defs.SchemaError:
        return
    for name, attr in list(node.attributes.items()):
        spec = schema.attributes.get(name)
        if spec is None or not spec.default_value.name:  # required, or no default
            continue
        default = onnx.helper.get_attribute_value(spec.default_value)
        value = attr.value
        if isinstance(default, bytes):
            default = default.decode()
        if isinstance(value, (list, tuple)) or isinstance(default, (list, tuple)):
            continue
        if value == default:
            del node.attributes[name]


_SOURCE_KEY = "fusion_export.source"


def _identity(tensor: ir.TensorProtocol) -> tuple:
    """Same key <=> same bytes: a parameter by its storage, a transposed parameter by its source, anything
    else by a content hash."""
    meta = getattr(tensor, "meta", None)
    if meta is not None and _SOURCE_KEY in meta:
        return meta[_SOURCE_KEY]
    raw = getattr(tensor, "raw", None)
    if isinstance(raw, torch.Tensor):
        storage = (raw.untyped_storage().data_ptr(), raw.storage_offset(), tuple(raw.stride()))
        return ("torch", *storage, tuple(raw.shape), str(raw.dtype))
    return ("bytes", hashlib.sha256(tensor.tobytes()).hexdigest())


class SharedWeightsFile:
    """One external data file that several graphs of a weights group point into."""

    def __init__(self, path: Path, on_bytes: Callable[[int], None] | None = None):
        self.path = path
        self.file = open(path, "wb")  # noqa: SIM115  closed in close()
        self.sha256 = hashlib.sha256()
        self.written: dict[tuple, tuple[int, int]] = {}  # identity -> (offset, length)
        self.on_bytes = on_bytes

    def _pad_to(self, alignment: int) -> None:
        pad = -self.file.tell() % alignment
        if pad:
            zeros = b"\0" * pad
            self.file.write(zeros)
            self.sha256.update(zeros)

    def externalize(self, model: ir.Model) -> None:
        """Move every initializer of `model` over INLINE_BYTES into this file (once per distinct tensor)."""
        for name, value in model.graph.initializers.items():
            tensor = value.const_value
            if tensor is None or tensor.nbytes < INLINE_BYTES:
                continue
            key = _identity(tensor)
            if key not in self.written:
                data = tensor.tobytes()
                self._pad_to(_LARGE_ALIGN if len(data) >= _LARGE else _SMALL_ALIGN)
                self.written[key] = (self.file.tell(), len(data))
                self.file.write(data)
                self.sha256.update(data)
                if self.on_bytes:
                    self.on_bytes(len(data))
            offset, length = self.written[key]
            value.const_value = ir.ExternalTensor(
                self.path.name, offset, length, tensor.dtype, shape=tensor.shape, name=name, base_dir=self.path.parent
            )

    def close(self) -> None:
        self.file.close()


def total_initializer_bytes(models: list[ir.Model]) -> int:
    seen, total = set(), 0
    for model in models:
        for value in model.graph.initializers.values():
            t = value.const_value
            if t is not None and t.nbytes >= INLINE_BYTES:
                key = _identity(t)
                if key not in seen:
                    seen.add(key)
                    total += t.nbytes
    return total


def save_group(models: dict[str, ir.Model], folder: Path, data_name: str, on_bytes=None) -> dict[str, str]:
    """Write `<name>.onnx` for each model plus one shared `data_name`; returns {file: sha256} of the data file."""
    weights = SharedWeightsFile(folder / data_name, on_bytes)
    try:
        for name, model in models.items():
            weights.externalize(model)
            ir.save(model, folder / f"{name}.onnx")
    finally:
        weights.close()
    return {data_name: weights.sha256.hexdigest()}
