"""Fused projections split by weight for ONNX Runtime (engines/onnxruntime/split_projections.py): the MatMul + Split
becomes one MatMul per part over a column slice of the weight, which ONNX Runtime folds into initializers, so the
session runs no Slice and no Split; the products are the same numbers; anything else stays as it is.

Tolerance: each column's dot product is the same sum either way; 1e-6 of the outputs' magnitude leaves room for a
kernel that blocks K differently for a narrower matrix.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from engines.onnxruntime.split_projections import split_projections

RELATIVE = 1e-6
K = 24


def projection(parts: list[int], *, sizes_input: bool, axis: int = -1, const_weight: bool = True, reread: bool = False):
    """x (batch, seq, K) @ W (K, sum(parts)) split on `axis` into len(parts) outputs, each through a Relu."""
    width = sum(parts)
    weight = np.random.default_rng(0).standard_normal((K, width)).astype(np.float32)
    inits = [numpy_helper.from_array(weight, "w")] if const_weight else []
    split_inputs = ["product"]
    if sizes_input:
        inits.append(numpy_helper.from_array(np.array(parts, np.int64), "sizes"))
        split_inputs.append("sizes")
    attributes = {} if sizes_input else {"num_outputs": len(parts)}
    names = [f"part{i}" for i in range(len(parts))]
    nodes = [
        helper.make_node("MatMul", ["x", "w"], ["product"]),
        helper.make_node("Split", split_inputs, names, axis=axis, **attributes),
        *(helper.make_node("Relu", [n], [f"y{i}"]) for i, n in enumerate(names)),
    ]
    outputs = [helper.make_tensor_value_info(f"y{i}", TensorProto.FLOAT, None) for i in range(len(parts))]
    if reread:  # the product read by something else too
        nodes.append(helper.make_node("Neg", ["product"], ["other"]))
        outputs.append(helper.make_tensor_value_info("other", TensorProto.FLOAT, None))
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", "seq", K])]
    if not const_weight:
        inputs.append(helper.make_tensor_value_info("w", TensorProto.FLOAT, [K, width]))
    model = helper.make_model(
        helper.make_graph(nodes, "projection", inputs, outputs, inits), opset_imports=[helper.make_opsetid("", 18)]
    )
    model.ir_version = 9
    return onnx.shape_inference.infer_shapes(model), weight


def _rewritten(model: onnx.ModelProto) -> tuple[onnx.ModelProto, int]:
    graph = ir.serde.deserialize_model(model)
    count = split_projections(graph)
    return ir.serde.serialize_model(graph), count


@pytest.mark.parametrize("parts,sizes_input", [([32, 32], False), ([16, 8, 8], True)], ids=["gate_up", "qkv-sizes"])
def test_split_projection_becomes_sliced_weights(parts, sizes_input, tmp_path):
    model, weight = projection(parts, sizes_input=sizes_input)
    rewritten, count = _rewritten(model)
    assert count == 1
    ops = [n.op_type for n in rewritten.graph.node]
    assert "Split" not in ops and ops.count("MatMul") == len(parts)

    options = ort.SessionOptions()
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    session = ort.InferenceSession(rewritten.SerializeToString(), options, providers=["CPUExecutionProvider"])
    optimized = onnx.load(tmp_path / "optimized.onnx")
    # the slices were folded into initializers: nothing is sliced or split per run
    assert not {"Slice", "Split"} & {n.op_type for n in optimized.graph.node}
    shapes = sorted(tuple(i.dims) for i in optimized.graph.initializer if len(i.dims) == 2)
    assert shapes == sorted((K, p) for p in parts)

    x = np.random.default_rng(1).standard_normal((2, 5, K)).astype(np.float32)
    expected = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})
    got = session.run(None, {"x": x})
    for e, g in zip(expected, got):
        assert e.shape == g.shape and np.abs(e - g).max() <= RELATIVE * np.abs(e).max()
    # and they are the parts of x W, in order
    start = 0
    for width, g in zip(parts, got):
        np.testing.assert_allclose(g, np.maximum(x @ weight[:, start : start + width], 0), rtol=1e-5, atol=1e-5)
        start += width


def test_other_splits_stay():
    assert _rewritten(projection([32, 32], sizes_input=False, reread=True)[0])[1] == 0  # product read again
    assert _rewritten(projection([32, 32], sizes_input=False, const_weight=False)[0])[1] == 0  # weight is an input
    model, _ = projection([3, 2], sizes_input=True, axis=1)  # not the last axis
    assert _rewritten(model)[1] == 0
