"""The vision encoder's eager attention as ONNX Runtime's MultiHeadAttention (engines/onnxruntime/vision_attention.py):
every form the tower exports is fused and computes what the graph does; what is not that pattern stays as it is.

Tolerance: the fused and eager forms differ only in summation order inside the kernel (~1e-7 relative here);
1e-5 of the outputs' magnitude leaves room for other CPUs.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from engines.onnxruntime.vision_attention import fuse_vision_attention

RELATIVE = 1e-5
HEADS, DIM, IMAGE_ROWS = 2, 8, 5
F32_MIN = float(np.finfo(np.float32).min)


def eager_attention(
    masked: bool,
    image_queries: bool,
    consumer: str,
    mask_rank: str = "keys",
    bias: bool = False,
    heads: int = HEADS,
    dim: int = DIM,
) -> onnx.ModelProto:
    """The tower's eager attention as the exporter writes it (reference_model/vision.py `VisionAttention.attend`):
    x (batch, seq, C) projected, viewed as heads, q k^T * scale, optionally masked per key with the float32
    minimum, float32 softmax, p v; `image_queries` slices q to the first rows (the early layers' image rows) and
    concatenates other rows after them, as those layers do."""
    c = heads * dim
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.standard_normal((c, c)).astype(np.float32) * 0.3, f"w{n}") for n in "qkvo"]
    inits += [
        numpy_helper.from_array(np.array([0, 0, heads, dim], np.int64), "heads_view"),
        numpy_helper.from_array(np.array([0, 0, c], np.int64), "merged"),
        numpy_helper.from_array(np.array(dim**-0.5, np.float32), "scale"),
        numpy_helper.from_array(np.array(F32_MIN, np.float32), "fill"),
        numpy_helper.from_array(np.array([0], np.int64), "zero"),
        numpy_helper.from_array(np.array([IMAGE_ROWS], np.int64), "rows"),
        numpy_helper.from_array(np.array([2], np.int64), "axis2"),
        numpy_helper.from_array(np.array([1, 2], np.int64), "axes12"),
        numpy_helper.from_array(np.array([1], np.int64), "axis1"),
    ]
    nodes = []
    for n, perm in (("q", [0, 2, 1, 3]), ("k", [0, 2, 3, 1]), ("v", [0, 2, 1, 3])):
        if bias:  # nn.Linear's bias: an Add after the MatMul
            inits.append(numpy_helper.from_array(rng.standard_normal(c).astype(np.float32), f"b{n}"))
            nodes += [
                helper.make_node("MatMul", ["x", f"w{n}"], [f"{n}_product"]),
                helper.make_node("Add", [f"{n}_product", f"b{n}"], [f"{n}_proj"]),
            ]
        else:
            nodes.append(helper.make_node("MatMul", ["x", f"w{n}"], [f"{n}_proj"]))
        nodes += [
            helper.make_node("Reshape", [f"{n}_proj", "heads_view"], [f"{n}_view"]),
            helper.make_node("Transpose", [f"{n}_view"], [f"{n}_t"], perm=perm),
        ]
    q = "q_t"
    if image_queries:
        nodes.append(helper.make_node("Slice", ["q_t", "zero", "rows", "axis2"], ["q_image"]))
        q = "q_image"
    nodes += [helper.make_node("MatMul", [q, "k_t"], ["qk"]), helper.make_node("Mul", ["qk", "scale"], ["scores"])]
    scores = "scores"
    if masked:
        if mask_rank == "keys":  # (batch, 1, 1, keys), True where masked
            nodes += [helper.make_node("Unsqueeze", ["keep", "axes12"], ["keep4"])]
        else:  # (batch, 1, seq, keys): a per-query mask, not a key padding mask
            nodes += [
                helper.make_node("Unsqueeze", ["keep", "axis1"], ["keep3"]),
                helper.make_node("Unsqueeze", ["keep3", "axis1"], ["keep4a"]),
                helper.make_node("And", ["keep4a", "square"], ["keep4"]),
            ]
        nodes += [
            helper.make_node("Not", ["keep4"], ["masked"]),
            helper.make_node("Where", ["masked", "fill", "scores"], ["scores_masked"]),
        ]
        scores = "scores_masked"
    nodes += [
        helper.make_node("Softmax", [scores], ["probs"], axis=-1),
        helper.make_node("Cast", ["probs"], ["probs32"], to=TensorProto.FLOAT),
        helper.make_node("MatMul", ["probs32", "v_t"], ["pv"]),
    ]
    out = "pv"
    if image_queries:  # the other rows: their own values (what they are does not matter to the rewrite)
        nodes += [
            helper.make_node("Slice", ["v_t", "rows", "end", "axis2"], ["v_rest"]),
            helper.make_node("Concat", ["pv", "v_rest"], ["all_rows"], axis=2),
        ]
        inits.append(numpy_helper.from_array(np.array([1 << 30], np.int64), "end"))
        out = "all_rows"
    if consumer == "merge":
        nodes += [
            helper.make_node("Transpose", [out], ["merged_t"], perm=[0, 2, 1, 3]),
            helper.make_node("Reshape", ["merged_t", "merged"], ["attn"]),
            helper.make_node("MatMul", ["attn", "wo"], ["y"]),
        ]
    else:  # the heads view itself is the output
        nodes.append(helper.make_node("Identity", [out], ["y"]))
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", "seq", c])]
    if masked:
        inputs.append(helper.make_tensor_value_info("keep", TensorProto.BOOL, ["batch", "seq"]))
        if mask_rank != "keys":
            inputs.append(helper.make_tensor_value_info("square", TensorProto.BOOL, [1, 1, "seq", "seq"]))
    graph = helper.make_graph(nodes, "eager", inputs, [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                              inits)  # fmt: skip
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 9
    return onnx.shape_inference.infer_shapes(model, data_prop=True)


def _fused(model: onnx.ModelProto) -> tuple[onnx.ModelProto, int]:
    graph = ir.serde.deserialize_model(model)
    count = fuse_vision_attention(graph)
    return ir.serde.serialize_model(graph), count


def _run(model: onnx.ModelProto, feeds: dict) -> np.ndarray:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {i.name: feeds[i.name] for i in session.get_inputs()})[0]


def _feeds(batch: int = 3, seq: int = 9, width: int = HEADS * DIM) -> dict:
    rng = np.random.default_rng(1)
    keep = np.ones((batch, seq), bool)
    keep[1, -2:] = False  # rows with padded instruction keys, of different lengths
    keep[2, -4:] = False
    return {
        "x": rng.standard_normal((batch, seq, width)).astype(np.float32),
        "keep": keep,
        "square": np.tril(np.ones((seq, seq), bool))[None, None],
    }


@pytest.mark.parametrize(
    "masked,image_queries,consumer,bias",
    [
        (True, True, "merge", True),
        (True, False, "merge", False),
        (False, False, "merge", True),
        (True, False, "heads", False),
    ],
    ids=["early-layer", "masked", "unmasked", "heads-view-output"],
)
def test_every_tower_form_is_fused_and_equal(masked, image_queries, consumer, bias):
    model = eager_attention(masked, image_queries, consumer, bias=bias)
    fused, count = _fused(model)
    ops = [n.op_type for n in fused.graph.node]
    assert count == 1 and "MultiHeadAttention" in ops
    (kernel,) = [n for n in fused.graph.node if n.op_type == "MultiHeadAttention"]
    assert (len(kernel.input) > 3 and kernel.input[3] != "") == bias  # the biases go to the kernel
    assert ("Add" in ops) == (bias and image_queries)  # unless another reader keeps v's (the other rows)
    assert not {"Softmax", "Where"} & set(ops)  # the eager chain is gone, not left beside the kernel
    feeds = _feeds()
    expected, got = _run(model, feeds), _run(fused, feeds)
    assert got.shape == expected.shape
    assert np.abs(got - expected).max() <= RELATIVE * np.abs(expected).max()


def test_full_size_heads():
    """SigLIP so400m's layout (16 heads of 72, the full-size preset's tower), masked early-layer form."""
    model = eager_attention(True, True, "merge", bias=True, heads=16, dim=72)
    fused, count = _fused(model)
    feeds = _feeds(width=16 * 72)
    expected, got = _run(model, feeds), _run(fused, feeds)
    assert count == 1 and np.abs(got - expected).max() <= RELATIVE * np.abs(expected).max()


def test_padded_keys_get_no_weight():
    """A padded key's value does not reach the output, in the fused form as in the graph."""
    model, _ = _fused(eager_attention(True, False, "merge"))
    feeds = _feeds()
    before = _run(model, feeds)
    feeds["x"] = feeds["x"].copy()
    feeds["x"][2, -4:] = 1e3  # only padded positions of row 2 change: its queries there change, not the rest
    after = _run(model, feeds)
    assert np.array_equal(before[:, :5], after[:, :5])


def test_other_patterns_stay_as_exported():
    # a per-query mask is not a key padding mask
    model = eager_attention(True, False, "merge", mask_rank="queries")
    fused, count = _fused(model)
    assert count == 0 and "Softmax" in [n.op_type for n in fused.graph.node]
    # scores observed as a graph output (calibration instruments graphs that way) must stay
    model = eager_attention(True, False, "merge")
    model.graph.output.append(helper.make_tensor_value_info("scores", TensorProto.FLOAT, None))
    assert _fused(model)[1] == 0
