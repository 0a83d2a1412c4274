"""The plugins' ONNX form: a node in our own domain named after the plugin, plus an ONNX local function of the same
name holding the standard-op decomposition. ONNX Runtime (and any TensorRT without the plugin) runs the function;
a builder with the plugin registered maps the node to it.

DecodeAttention(q, k, v, start, end) -> out, as `decode_attention.decode_attention_reference` defines it: the
function masks columns outside [start, end) (and after each new token's own column) and runs a float32 softmax;
the plugin kernel reads only those columns.

WindowMaxPool(grid, index) -> out, as `window_max_pool.window_max_pool_reference` defines it: `index` is the
(n, k) window table of `fusion_export/graphs/window_pool.window_indices` (each window padded by repeating its last
index); the function gathers rows, takes their max, then the same over columns. The plugin kernel computes the
windows from H, W and n, reading each element of a window once.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

DOMAIN = "fusion_export.plugins"
DECODE_ATTENTION = "DecodeAttention"
WINDOW_MAX_POOL = "WindowMaxPool"
INTERACTION_ATTENTION = "InteractionAttention"
KV_SCALES = ("k_scale", "v_scale")  # DecodeAttention's float attributes: an int8 cache's per-tensor scales (else 1)


def _const(name: str, value) -> onnx.NodeProto:
    return helper.make_node("Constant", [], [name], value=numpy_helper.from_array(np.asarray(value), name))


def register_schemas() -> None:
    """The plugin ops' schemas in ONNX's registry, so exporters (onnxscript) can emit them; once per process."""
    from onnx.defs import OpSchema, has, register_schema

    p = OpSchema.FormalParameter
    schemas = {
        DECODE_ATTENTION: dict(
            inputs=[p("q", "T"), p("k", "K"), p("v", "K"), p("start", "I"), p("end", "I")],
            type_constraints=[("T", ["tensor(float)", "tensor(float16)"], "activations"),
                              ("K", ["tensor(float)", "tensor(float16)", "tensor(int8)"], "q's type, or int8"),
                              ("I", ["tensor(int32)"], "per-row column range")],
            attributes=[OpSchema.Attribute(name, helper.make_attribute(name, 1.0), "int8 cache: value = int8 * scale")
                        for name in KV_SCALES],
        ),
        WINDOW_MAX_POOL: dict(
            inputs=[p("grid", "T"), p("index", "I")],
            type_constraints=[("T", ["tensor(float)", "tensor(float16)", "tensor(int8)"], "grid values"),
                              ("I", ["tensor(int64)"], "window table")],
        ),
        INTERACTION_ATTENTION: dict(
            inputs=[p("q", "T"), p("k", "T"), p("v", "T")],
            type_constraints=[("T", ["tensor(float)", "tensor(float16)"], "activations")],
        ),
    }  # fmt: skip
    for name, schema in schemas.items():
        if not has(name, DOMAIN):
            register_schema(OpSchema(name, DOMAIN, 1, outputs=[p("out", "T")], **schema))


def _attribute_constant(name: str, attribute: str) -> onnx.NodeProto:
    """A Constant holding the calling node's float attribute `attribute` (a function-body reference)."""
    node = helper.make_node("Constant", [], [name])
    node.attribute.append(
        onnx.AttributeProto(name="value_float", ref_attr_name=attribute, type=onnx.AttributeProto.FLOAT)
    )
    return node


def decode_attention_function(opset: int = 20, int8_cache: bool = False) -> onnx.FunctionProto:
    """The standard-op decomposition (opset >= 15 for CastLike). A model holds one body per op, so the exporter
    picks it by the cache's type: `int8_cache` dequantizes K and V first (DequantizeLinear by the node's k_scale /
    v_scale, the one form in which TensorRT reads int8 tensors), the float body casts them to float32."""
    n = helper.make_node
    if int8_cache:
        read_cache = [
            _attribute_constant("k_scale", "k_scale"), _attribute_constant("v_scale", "v_scale"),
            # an explicit int8 zero point: without one, ONNX Runtime 1.32's graph optimizations turned every
            # negative cache value into 0 in front of the GQA Expand below (measured; no optimizations: correct)
            _const("zero_point", np.array(0, np.int8)),
            n("DequantizeLinear", ["k", "k_scale", "zero_point"], ["kd"]),
            n("DequantizeLinear", ["v", "v_scale", "zero_point"], ["vd"]),
        ]  # fmt: skip
    else:
        read_cache = [n("CastLike", ["k", "f1"], ["kd"]), n("CastLike", ["v", "f1"], ["vd"])]
    nodes = [
        _const("i0", np.array([0], np.int64)), _const("i1", np.array([1], np.int64)),
        _const("i2", np.array([2], np.int64)), _const("i3", np.array([3], np.int64)),
        _const("i4", np.array([4], np.int64)), _const("zero", np.array(0, np.int64)),
        _const("one", np.array(1, np.int64)), _const("neg_inf", np.array(-np.inf, np.float32)),
        _const("f1", np.array(1.0, np.float32)),
        *read_cache,  # kd, vd: the cache in float32
        n("Shape", ["q"], ["sq"]), n("Shape", ["kd"], ["sk"]),
        n("Slice", ["sq", "i0", "i1"], ["B"]), n("Slice", ["sq", "i1", "i2"], ["H"]),
        n("Slice", ["sq", "i2", "i3"], ["T"]), n("Slice", ["sq", "i3", "i4"], ["D"]),
        n("Slice", ["sk", "i1", "i2"], ["KVH"]), n("Slice", ["sk", "i2", "i3"], ["C"]),
        n("Div", ["H", "KVH"], ["G"]),
        n("Concat", ["B", "KVH", "G", "C", "D"], ["s5"], axis=0), n("Concat", ["B", "H", "C", "D"], ["s4"], axis=0),
        # GQA: every KV head serves G query heads
        n("Unsqueeze", ["kd", "i2"], ["k5"]), n("Expand", ["k5", "s5"], ["kx5"]), n("Reshape", ["kx5", "s4"], ["kf"]),
        n("Unsqueeze", ["vd", "i2"], ["v5"]), n("Expand", ["v5", "s5"], ["vx5"]), n("Reshape", ["vx5", "s4"], ["vf"]),
        # CastLike, not Cast: ONNX Runtime 1.32's basic optimizer drops a float->float Cast of a graph input and
        # leaves its consumers dangling ("... is not a graph input, initializer, or output of a previous node")
        n("CastLike", ["q", "f1"], ["qf"]),
        n("Cast", ["D"], ["Df"], to=TensorProto.FLOAT), n("Sqrt", ["Df"], ["sqrt_d"]),
        n("Div", ["f1", "sqrt_d"], ["scale"]),
        n("Mul", ["qf", "scale"], ["qs"]), n("Transpose", ["kf"], ["kt"], perm=[0, 1, 3, 2]),
        n("MatMul", ["qs", "kt"], ["scores"]),  # [B, H, T, C]
        n("Squeeze", ["C", "i0"], ["C0"]), n("Squeeze", ["T", "i0"], ["T0"]),
        n("Range", ["zero", "C0", "one"], ["col"]), n("Range", ["zero", "T0", "one"], ["t"]),
        n("Cast", ["start"], ["s64"], to=TensorProto.INT64), n("Cast", ["end"], ["e64"], to=TensorProto.INT64),
        n("Sub", ["e64", "T0"], ["first_new"]), n("Unsqueeze", ["first_new", "i1"], ["fn2"]),
        n("Add", ["fn2", "t"], ["last"]),  # [B, T]: each new token's own column
        n("Unsqueeze", ["last", "i2"], ["last3"]), n("Unsqueeze", ["s64", "i1"], ["s2"]),
        n("Unsqueeze", ["s2", "i2"], ["s3"]),
        n("GreaterOrEqual", ["col", "s3"], ["after_start"]), n("LessOrEqual", ["col", "last3"], ["up_to_own"]),
        n("And", ["after_start", "up_to_own"], ["visible3"]), n("Unsqueeze", ["visible3", "i1"], ["visible"]),
        n("Where", ["visible", "scores", "neg_inf"], ["masked"]),
        n("Softmax", ["masked"], ["probs"], axis=-1),
        n("MatMul", ["probs", "vf"], ["out_f"]), n("CastLike", ["out_f", "q"], ["out"]),
    ]  # fmt: skip
    return helper.make_function(
        DOMAIN, DECODE_ATTENTION, ["q", "k", "v", "start", "end"], ["out"], nodes,
        [helper.make_opsetid("", opset)], attribute_protos=[helper.make_attribute(a, 1.0) for a in KV_SCALES],
    )  # fmt: skip


def _one_node_model(graph: onnx.GraphProto, function: onnx.FunctionProto, opset: int) -> onnx.ModelProto:
    """A test unit: the plugin node's graph with its local function and both opsets."""
    model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", opset), helper.make_opsetid(DOMAIN, 1)],
        functions=[function],
    )
    model.ir_version = 9
    return model


def decode_attention_model(
    dtype: int,
    heads: int,
    kv_heads: int,
    head_dim: int,
    opset: int = 20,
    kv_dtype: int | None = None,
    k_scale: float = 1.0,
    v_scale: float = 1.0,
) -> onnx.ModelProto:
    """A one-node model (dynamic batch, new tokens and capacity): the unit the plugin's tests parse and run.
    `kv_dtype`: the cache's type (default q's; TensorProto.INT8 with its scales for an int8 cache)."""
    io = helper.make_tensor_value_info
    kv_dtype = kv_dtype or dtype
    node = helper.make_node(DECODE_ATTENTION, ["q", "k", "v", "start", "end"], ["out"], domain=DOMAIN,
                            k_scale=float(k_scale), v_scale=float(v_scale))  # fmt: skip
    graph = helper.make_graph(
        [node],
        "decode_attention",
        [io("q", dtype, ["B", heads, "T", head_dim]), io("k", kv_dtype, ["B", kv_heads, "C", head_dim]),
         io("v", kv_dtype, ["B", kv_heads, "C", head_dim]), io("start", TensorProto.INT32, ["B"]),
         io("end", TensorProto.INT32, ["B"])],
        [io("out", dtype, ["B", heads, "T", head_dim])],
    )  # fmt: skip
    return _one_node_model(graph, decode_attention_function(opset, kv_dtype == TensorProto.INT8), opset)


def window_max_pool_function(opset: int = 20) -> onnx.FunctionProto:
    """The standard-op decomposition: Gather + ReduceMax over rows, then over columns (as window_pool.py)."""
    n = helper.make_node

    def reduce_max(x: str, axis: str, out: str) -> list[onnx.NodeProto]:
        if opset >= 18:  # axes became an input in opset 18
            return [n("ReduceMax", [x, axis], [out], keepdims=0)]
        return [n("ReduceMax", [x], [out], axes=[int(axis[1:])], keepdims=0)]

    nodes = [
        _const("i0", np.array([0], np.int64)), _const("i1", np.array([1], np.int64)),
        _const("i2", np.array([2], np.int64)), _const("i3", np.array([3], np.int64)),
        _const("i4", np.array([4], np.int64)), _const("minus1", np.array([-1], np.int64)),
        n("Shape", ["grid"], ["sg"]), n("Shape", ["index"], ["si"]),
        n("Slice", ["sg", "i0", "i1"], ["B"]), n("Slice", ["sg", "i2", "i3"], ["W"]),
        n("Slice", ["sg", "i3", "i4"], ["D"]), n("Slice", ["si", "i0", "i1"], ["N"]),
        n("Slice", ["si", "i1", "i2"], ["K"]),
        n("Reshape", ["index", "minus1"], ["flat"]),
        n("Gather", ["grid", "flat"], ["rows_k"], axis=1),  # [B, N*K, W, D]
        n("Concat", ["B", "N", "K", "W", "D"], ["s_rows"], axis=0), n("Reshape", ["rows_k", "s_rows"], ["rows5"]),
        *reduce_max("rows5", "i2", "rows"),  # [B, N, W, D]
        n("Gather", ["rows", "flat"], ["cols_k"], axis=2),  # [B, N, N*K, D]
        n("Concat", ["B", "N", "N", "K", "D"], ["s_cols"], axis=0), n("Reshape", ["cols_k", "s_cols"], ["cols5"]),
        *reduce_max("cols5", "i3", "cols"),  # [B, N, N, D]
        n("Concat", ["B", "minus1", "D"], ["s_out"], axis=0), n("Reshape", ["cols", "s_out"], ["out"]),
    ]  # fmt: skip
    return helper.make_function(
        DOMAIN, WINDOW_MAX_POOL, ["grid", "index"], ["out"], nodes, [helper.make_opsetid("", opset)]
    )


def window_max_pool_model(dtype: int, side: int, out_size: int, channels: int, opset: int = 20) -> onnx.ModelProto:
    """A one-node model (dynamic batch) with the window table as an initializer: the unit the tests parse and run."""
    from .reference import window_indices

    io = helper.make_tensor_value_info
    index = numpy_helper.from_array(window_indices(side, out_size).numpy(), "index")
    graph = helper.make_graph(
        [helper.make_node(WINDOW_MAX_POOL, ["grid", "index"], ["out"], domain=DOMAIN)],
        "window_max_pool",
        [io("grid", dtype, ["B", side, side, channels])],
        [io("out", dtype, ["B", out_size * out_size, channels])],
        initializer=[index],
    )
    return _one_node_model(graph, window_max_pool_function(opset), opset)


def interaction_attention_function(opset: int = 20) -> onnx.FunctionProto:
    """The standard-op decomposition: the context grid regrouped into windows, then one softmax per latent and head.

    ```text
    k [B, s*w, s*w, H, D] -Reshape-> [B, s, w, s, w, H, D] -Transpose-> [B, s, s, H, w, w, D] -Reshape-> keys
    keys [B, s, s, H, w*w, D];  q -> [B, s, s, H, 1, D];  out = Softmax(q keys^T / sqrt(D)) values
    ```
    """
    n = helper.make_node
    nodes = [
        _const("i0", np.array([0], np.int64)), _const("i1", np.array([1], np.int64)),
        _const("i2", np.array([2], np.int64)), _const("i3", np.array([3], np.int64)),
        _const("i4", np.array([4], np.int64)), _const("i5", np.array([5], np.int64)),
        _const("f1", np.array(1.0, np.float32)),
        n("Shape", ["q"], ["sq"]), n("Shape", ["k"], ["sk"]),
        n("Slice", ["sq", "i0", "i1"], ["B"]), n("Slice", ["sq", "i1", "i2"], ["S"]),
        n("Slice", ["sq", "i3", "i4"], ["H"]), n("Slice", ["sq", "i4", "i5"], ["D"]),
        n("Slice", ["sk", "i1", "i2"], ["G"]), n("Div", ["G", "S"], ["W"]), n("Mul", ["W", "W"], ["W2"]),
        n("Concat", ["B", "S", "W", "S", "W", "H", "D"], ["s7"], axis=0),
        n("Concat", ["B", "S", "S", "H", "W2", "D"], ["s6"], axis=0),
        # CastLike, not Cast: see decode_attention_function
        n("CastLike", ["q", "f1"], ["qf"]), n("CastLike", ["k", "f1"], ["kf"]), n("CastLike", ["v", "f1"], ["vf"]),
        n("Reshape", ["kf", "s7"], ["k7"]), n("Transpose", ["k7"], ["kt7"], perm=[0, 1, 3, 5, 2, 4, 6]),
        n("Reshape", ["kt7", "s6"], ["keys"]),  # [B, s, s, H, w*w, D]
        n("Reshape", ["vf", "s7"], ["v7"]), n("Transpose", ["v7"], ["vt7"], perm=[0, 1, 3, 5, 2, 4, 6]),
        n("Reshape", ["vt7", "s6"], ["values"]),
        n("Cast", ["D"], ["Df"], to=TensorProto.FLOAT), n("Sqrt", ["Df"], ["sqrt_d"]),
        n("Div", ["f1", "sqrt_d"], ["scale"]), n("Mul", ["qf", "scale"], ["qs"]),
        n("Unsqueeze", ["qs", "i4"], ["q6"]),  # [B, s, s, H, 1, D]
        n("Transpose", ["keys"], ["keys_t"], perm=[0, 1, 2, 3, 5, 4]),
        n("MatMul", ["q6", "keys_t"], ["scores"]),  # [B, s, s, H, 1, w*w]
        n("Softmax", ["scores"], ["probs"], axis=-1),
        n("MatMul", ["probs", "values"], ["out6"]), n("Squeeze", ["out6", "i4"], ["out_f"]),
        n("CastLike", ["out_f", "q"], ["out"]),
    ]  # fmt: skip
    return helper.make_function(
        DOMAIN, INTERACTION_ATTENTION, ["q", "k", "v"], ["out"], nodes, [helper.make_opsetid("", opset)]
    )


def interaction_attention_model(
    dtype: int, side: int, window: int, heads: int, head_dim: int, opset: int = 20
) -> onnx.ModelProto:
    """A one-node model (dynamic batch) for an s x s latent grid over an (s*w) x (s*w) context."""
    io = helper.make_tensor_value_info
    grid = side * window
    graph = helper.make_graph(
        [helper.make_node(INTERACTION_ATTENTION, ["q", "k", "v"], ["out"], domain=DOMAIN)],
        "interaction_attention",
        [io("q", dtype, ["B", side, side, heads, head_dim]), io("k", dtype, ["B", grid, grid, heads, head_dim]),
         io("v", dtype, ["B", grid, grid, heads, head_dim])],
        [io("out", dtype, ["B", side, side, heads, head_dim])],
    )  # fmt: skip
    return _one_node_model(graph, interaction_attention_function(opset), opset)


PLUGIN_FUNCTIONS = {
    DECODE_ATTENTION: decode_attention_function,
    WINDOW_MAX_POOL: window_max_pool_function,
    INTERACTION_ATTENTION: interaction_attention_function,
}
