"""ONNX Runtime's fused residual norm for the decoder graphs: `Add` + RMSNorm as one
`com.microsoft.SkipSimplifiedLayerNormalization`, rewritten in memory with the fused attention (ort_attention.py).

Every decoder layer but the first starts its two norms from a residual sum, `h = a + b; y = rms_norm(h) * g`, and
keeps `h` for the next residual. The contrib op computes both in one pass (its fourth output is the sum), so a
step runs 2 * layers fewer nodes. The norm comes in two forms: opset 23's `RMSNormalization` (trt-10.15 graphs)
and, below opset 23 (trt-10.3), its decomposition `g * x / sqrt(mean(x^2, -1) + eps)`. ONNX Runtime 1.32 fuses
neither with the Add: its SkipLayerNorm fusion skips a sum that is used again, and it does not match the standard
op. The math is the same (float32 sum, float32 mean of squares, then the scale); parity is tested against the
unfused graphs.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

MS_DOMAIN = "com.microsoft"


@dataclass
class _Norm:
    x: ir.Value
    scale: ir.Value
    epsilon: float
    nodes: list[ir.Node]  # what the fused op replaces, the output last
    output: ir.Value


def small_constant(value: ir.Value | None) -> np.ndarray | None:
    """A small constant's values (exponent, axes, epsilon, slice bounds, split sizes), or None; weights are never
    read (they may be external). Shared by the ONNX Runtime rewrites (ort_vision_attention, ort_split_projections)."""
    tensor = ir.convenience.get_const_tensor(value) if value is not None else None
    return None if tensor is None or tensor.size > 8 else tensor.numpy()


def _is_vector(value: ir.Value) -> bool:
    tensor = ir.convenience.get_const_tensor(value)
    return tensor is not None and len(tensor.shape) == 1


def _producer(value: ir.Value, op_type: str) -> ir.Node | None:
    """`value`'s producer when it is a standard `op_type` whose output only the matched chain reads."""
    node = value.producer()
    if node is None or node.op_type != op_type or node.domain != "" or len(value.uses()) != 1:
        return None
    return None if value.is_graph_output() else node


def _last_axis(node: ir.Node, x: ir.Value) -> bool:
    """A ReduceMean (axes as input from opset 18, as attribute before) over x's last axis only, dims kept."""
    axes = small_constant(node.inputs[1]) if len(node.inputs) > 1 else node.attributes.get_ints("axes")
    if axes is None or node.attributes.get_int("keepdims", 1) != 1:
        return False
    axes = [int(a) for a in np.atleast_1d(axes)]
    if x.shape is None:
        return axes == [-1]
    return [a % len(x.shape) for a in axes] == [len(x.shape) - 1]


def _rms_norm(node: ir.Node) -> _Norm | None:
    """The RMSNorm whose last node is `node`, in either form, normalizing the last axis; else None."""
    if node.domain != "":
        return None
    if node.op_type == "RMSNormalization" and len(node.inputs) == 2:
        x = node.inputs[0]
        rank = len(x.shape) if x.shape is not None else 0
        if node.attributes.get_int("axis", -1) not in (-1, rank - 1):
            return None
        return _Norm(x, node.inputs[1], node.attributes.get_float("epsilon", 1e-5), [node], node.outputs[0])
    if node.op_type != "Mul" or len(node.inputs) != 2:  # g * (x / sqrt(mean(x^2) + eps)), either operand order
        return None
    scaled = [v for v in node.inputs if _is_vector(v)]
    others = [v for v in node.inputs if v not in scaled]
    if len(scaled) != 1 or len(others) != 1:
        return None
    div = _producer(others[0], "Div")
    sqrt = div and _producer(div.inputs[1], "Sqrt")
    add = sqrt and _producer(sqrt.inputs[0], "Add")
    if add is None:
        return None
    constants = [small_constant(v) for v in add.inputs]
    eps = [c for c in constants if c is not None and c.size == 1]
    mean = next((_producer(v, "ReduceMean") for v, c in zip(add.inputs, constants) if c is None), None)
    power = mean and _producer(mean.inputs[0], "Pow")
    x = div.inputs[0]
    if power is None or len(eps) != 1 or power.inputs[0] is not x:
        return None
    square = small_constant(power.inputs[1])
    if square is None or square.size != 1 or float(square) != 2.0 or not _last_axis(mean, x):
        return None
    return _Norm(x, scaled[0], float(eps[0]), [power, mean, add, sqrt, div, node], node.outputs[0])


def fuse_skip_norms(model: ir.Model) -> int:
    """Rewrite every RMSNorm whose input is an Add of two same-shape float32 tensors; returns how many."""
    graph, fused = model.graph, 0
    for node in list(graph):
        norm = _rms_norm(node) if node.graph is graph else None
        if norm is None:
            continue
        add = norm.x.producer()
        if add is None or add.op_type != "Add" or add.domain != "" or len(add.inputs) != 2:
            continue
        a, b = add.inputs
        if a.shape is None or a.shape != b.shape or a.dtype != ir.DataType.FLOAT or b.dtype != ir.DataType.FLOAT:
            continue  # the contrib op adds equal-shape float32 inputs only
        if norm.x.is_graph_output() or norm.output.is_graph_output():
            continue  # observed values (a graph instrumented for calibration) stay as they are
        skip = ir.node(
            "SkipSimplifiedLayerNormalization",
            [a, b, norm.scale],
            attributes={"epsilon": norm.epsilon},
            domain=MS_DOMAIN,
            num_outputs=4,  # output, mean, inverse std (unused), the sum a + b
        )
        graph.insert_before(add, skip)
        out, total = skip.outputs[0], skip.outputs[3]
        for new, old in ((out, norm.output), (total, add.outputs[0])):  # the next layer's match reads shapes
            new.name, new.shape, new.type = f"{old.name}.fused", old.shape, old.type
        ir.convenience.replace_all_uses_with(norm.output, out)
        ir.convenience.replace_all_uses_with(add.outputs[0], total)
        graph.remove([*norm.nodes, add], safe=True)
        fused += 1
    if fused:
        model.opset_imports[MS_DOMAIN] = 1
    return fused
