"""An INT8 KV cache in the decoder graphs: the cache buffers become INT8, each layer's new keys and values are
quantized (QuantizeLinear, one per-tensor scale per buffer, zero point 0) before the scatter writes them, and
what reads the written buffer reads it through DequantizeLinear. The semantics are the reference's
(`reference_model/kv_cache.py`): the prefill attends to its own keys and values as computed, a step to the stored
columns, its own included. The cache moves a quarter of the bytes of float32's: on the `small` preset at 1k
context, 34 MB of a step's ~210 MB.

TensorScatter (the trt-10.15 graphs' write, TensorRT's KV-cache update layer) takes float caches only: TensorRT-RTX
1.7 refuses an INT8 one at parse time ("cache has type Int8 but must have type Float, Half, or BFloat16"), while
ScatterElements and ScatterND build with INT8 data. So an INT8 cache's writes are ScatterND, with one
(row, head, column) index per written vector, built once per graph from TensorScatter's own write columns.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from fusion_export.graph_inputs import past_names
from fusion_export.manifest import KV_SCALE_SUFFIX
from fusion_export.plugin_ops.onnx_forms import DECODE_ATTENTION, DOMAIN, KV_SCALES, decode_attention_function
from reference_model.errors import FusionError

from .qdq import initializer

WRITE_UPDATE = {"ScatterElements": 2, "ScatterND": 2, "TensorScatter": 1}  # the write's input holding the update
ZERO_POINT = "fusion_export.kv_cache.zero_point"  # explicit int8: without one ORT 1.32 zeroed negative values


def kv_writes(graph: ir.Graph, num_layers: int) -> dict[str, ir.Node]:
    """Each cache input's write: the one node that reads the buffer's values (Shape nodes read only its shape; an
    error names the input where that is not so, e.g. a graph that is not an exported decoder)."""
    inputs = {v.name: v for v in graph.inputs}
    writes = {}
    for name in past_names(num_layers):
        if name not in inputs:
            raise FusionError(f"{graph.name}: no KV cache input {name}")
        users = [user for user, _ in inputs[name].uses()]
        scatters = [u for u in users if u.op_type in WRITE_UPDATE]
        if len(scatters) != 1 or any(u.op_type not in ("Shape", *WRITE_UPDATE) for u in users):
            kinds = ", ".join(u.op_type for u in users) or "nothing"
            raise FusionError(f"{graph.name}: {name} is read by {kinds}, not by one scatter into the cache")
        writes[name] = scatters[0]
    return writes


def write_update(node: ir.Node) -> ir.Value:
    """The new keys or values a cache write stores."""
    return node.inputs[WRITE_UPDATE[node.op_type]]


def _row_index(graph: ir.Graph, write: ir.Node, kv_heads: int) -> list[ir.Node]:
    """ScatterND's (batch, kv_heads, n, 3) index of (row, head, column) for a TensorScatter's update (batch,
    kv_heads, n, head_dim) written from its write_indices (zeros when absent); the nodes computing it. Sizes come
    from `inputs_embeds` (batch, n, hidden), not from a layer's tensors: the index is shared by every layer, and
    ONNX Runtime's attention rewrite reads a layer by what crosses its boundary."""
    if write.attributes.get_string("mode", "linear") != "linear":
        raise FusionError(f"{graph.name}: {write.name} is a circular TensorScatter")
    embeds = next((v for v in graph.inputs if v.name == "inputs_embeds"), None)
    if embeds is None:
        raise FusionError(f"{graph.name}: no inputs_embeds input (not an exported decoder graph)")
    columns = write.inputs[2] if len(write.inputs) > 2 else None
    nodes: list[ir.Node] = []

    def op(op_type: str, *inputs, **attributes) -> ir.Value:
        nodes.append(ir.node(op_type, list(inputs), attributes=attributes, name=f"kv_cache/row_index/{len(nodes)}"))
        return nodes[-1].outputs[0]

    def const(array) -> ir.Value:
        return op("Constant", value=ir.tensor(np.asarray(array, np.int64)))

    batch, new = (op("Shape", embeds, start=i, end=i + 1) for i in (0, 1))
    size = [op("Squeeze", batch), op("Squeeze", new)]  # as scalars
    grid = op("Concat", batch, const([kv_heads]), new, const([1]), axis=0)
    zeros = op("ConstantOfShape", grid, value=ir.tensor(np.zeros(1, np.int64)))

    def along(values: ir.Value, shape: list[int]) -> ir.Value:  # values on one axis of the (batch, heads, n, 1) grid
        return op("Add", op("Reshape", values, const(shape)), zeros)

    rows = along(op("Range", const(0), size[0], const(1)), [-1, 1, 1, 1])
    heads = along(const(np.arange(kv_heads)), [1, -1, 1, 1])
    cols = along(op("Range", const(0), size[1], const(1)), [1, 1, -1, 1])
    if columns is not None:
        cols = op("Add", cols, op("Reshape", op("Cast", columns, to=ir.DataType.INT64), const([-1, 1, 1, 1])))
    op("Concat", rows, heads, cols, axis=-1)
    return nodes


def _plugin_reads(readers: list[tuple[ir.Node, int]], which: int) -> list[tuple[ir.Node, int]]:
    """The DecodeAttention plugin nodes among a buffer's readers, as its key (which 0) or value (1) input."""
    return [
        (user, j)
        for user, j in readers
        if user.domain == DOMAIN and user.op_type == DECODE_ATTENTION and j == 1 + which
    ]


def quantize_kv_cache(
    model: ir.Model, num_layers: int, kv_heads: int, scales: list[tuple[float, float]], scale_dtype=np.float32
) -> int:
    """Rewrite a decoder graph's cache as INT8 with per-layer (key, value) `scales`; returns the writes rewritten.
    A `--plugins on` step's DecodeAttention nodes read the INT8 buffers themselves, the scales as their k_scale /
    v_scale attributes (the plugin dequantizes on load, a quarter of the bytes read), and the model's local
    function for the op becomes its INT8 body."""
    graph = model.graph
    writes = kv_writes(graph, num_layers)
    zero_point = initializer(graph, ZERO_POINT, np.zeros((), np.int8))
    inputs = {v.name: v for v in graph.inputs}
    row_index: ir.Value | None = None
    plugin_read = False
    for i, (name, write) in enumerate(writes.items()):
        # in the cache's float dtype: QuantizeLinear's input and scale share one type
        scale = initializer(graph, name + KV_SCALE_SUFFIX, np.array(scales[i // 2][i % 2], scale_dtype))
        update = write_update(write)
        quantize = ir.node("QuantizeLinear", [update, scale, zero_point], name=f"{name}/quantize")
        graph.insert_before(write, quantize)
        int8_update = quantize.outputs[0]
        int8_update.type, int8_update.shape = ir.TensorType(ir.DataType.INT8), update.shape
        present = write.outputs[0]
        readers = [(user, j) for user, j in present.uses()]  # before the DequantizeLinear below reads it too
        if write.op_type == "TensorScatter":  # TensorRT's KV-cache update takes no INT8 cache (module docstring)
            if row_index is None:
                index_nodes = _row_index(graph, write, kv_heads)
                graph.insert_before(write, index_nodes)
                row_index = index_nodes[-1].outputs[0]
            scatter = ir.node("ScatterND", [inputs[name], row_index, int8_update], name=f"{name}/write")
            scatter.metadata_props.update(write.metadata_props)  # its region record (ort_attention.py)
            graph.insert_before(write, scatter)
            new_present = scatter.outputs[0]
            ir.convenience.replace_all_uses_with(present, new_present, replace_graph_outputs=True)
            new_present.name, present.name = present.name, f"{present.name}.float"
            new_present.shape = present.shape
            graph.remove(write, safe=True)
            present = new_present
        else:
            write.replace_input_with(WRITE_UPDATE[write.op_type], int8_update)
        inputs[name].type = present.type = ir.TensorType(ir.DataType.INT8)
        plugins = _plugin_reads(readers, i % 2)
        for user, _ in plugins:  # reads the INT8 buffer itself (the node's input is already `present`)
            user.attributes[KV_SCALES[i % 2]] = ir.AttrFloat32(KV_SCALES[i % 2], scales[i // 2][i % 2])
        others = [r for r in readers if r not in plugins]
        if others:  # a step's attention reads the buffer it has written
            dequantize = ir.node("DequantizeLinear", [present, scale, zero_point], name=f"{name}/dequantize")
            dequantize.outputs[0].type, dequantize.outputs[0].shape = update.type, present.shape
            graph.insert_after(present.producer(), dequantize)
            for user, j in others:
                user.replace_input_with(j, dequantize.outputs[0])
        plugin_read |= bool(plugins)
    if plugin_read:
        key = (DOMAIN, DECODE_ATTENTION, "")
        opset = model.functions[key].opset_imports[""]
        model.functions[key] = ir.serde.deserialize_function(decode_attention_function(opset, int8_cache=True))
    return len(writes)
