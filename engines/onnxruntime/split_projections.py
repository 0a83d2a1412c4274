"""Fused projections split by weight instead of by output, for ONNX Runtime's CPU kernels, in memory: a
`MatMul(x, W)` whose output only a `Split` on its last axis reads (Phi-3's gate_up projection; the qkv projection
where the graph splits it) becomes one MatMul per part, each over a column slice of W.

The shipped graphs keep the fused projection: TensorRT runs one GEMM and its split costs nothing there. ONNX
Runtime's Split copies every part out of the product: in a 1040-position prefill of the `small` preset, the 8
gate_up splits copied 100 MB (~28 ms of a ~560 ms prefill, ONNX Runtime profile). Sliced weights cost no copy at
run time: each `Slice` of an initializer is a constant, which ONNX Runtime folds into a new initializer when the
session is created (and prepacks like any MatMul weight), so the sliced form holds the same bytes of weights as
the fused one. It is applied only where each session keeps its own prepacked weights (`OrtModel` packed mode):
with weights shared between sessions, the folded slices would be private copies. The products are the same
numbers: column j of x W is x times column j of W either way.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from .norms import small_constant


def _parts(split: ir.Node, width: int) -> list[int] | None:
    """The Split's part widths along the last axis (of `width` columns), or None when they are not known."""
    if len(split.inputs) > 1 and split.inputs[1] is not None:
        sizes = small_constant(split.inputs[1])
        return [int(n) for n in sizes] if sizes is not None and int(sizes.sum()) == width else None
    count = split.attributes.get_int("num_outputs", len(split.outputs))
    if count != len(split.outputs) or width % count:
        return None  # uneven num_outputs splits are not worth the rules they follow
    return [width // count] * count


def split_projections(model: ir.Model) -> int:
    """Rewrite every last-axis Split of a float32 MatMul by a constant weight; returns how many."""
    graph, rewritten = model.graph, 0
    for split in [n for n in graph if n.op_type == "Split" and n.domain == ""]:
        product = split.inputs[0]
        matmul = product.producer()
        if matmul is None or matmul.op_type != "MatMul" or matmul.domain != "" or product.is_graph_output():
            continue
        if any(output.is_graph_output() for output in split.outputs):
            continue
        if len(list(product.uses())) != 1:
            continue
        x, weight = matmul.inputs
        if weight.const_value is None or weight.dtype != ir.DataType.FLOAT or weight.shape is None:
            continue
        if len(weight.shape) != 2 or not all(isinstance(d, int) for d in weight.shape):
            continue
        rank = len(product.shape) if product.shape is not None else None
        axis = split.attributes.get_int("axis", 0)
        if rank is None or axis not in (-1, rank - 1):
            continue
        parts = _parts(split, weight.shape[1])
        if parts is None:
            continue
        one = ir.node("Constant", [], attributes={"value": ir.tensor(np.array([1], np.int64))})
        graph.insert_before(matmul, one)
        start = 0
        for width, output in zip(parts, split.outputs):
            bounds = [
                ir.node("Constant", [], attributes={"value": ir.tensor(np.array([b], np.int64))})
                for b in (start, start + width)
            ]
            columns = ir.node("Slice", [weight, bounds[0].outputs[0], bounds[1].outputs[0], one.outputs[0]])
            part = ir.node("MatMul", [x, columns.outputs[0]])
            for node in (*bounds, columns, part):
                graph.insert_before(matmul, node)
            new = part.outputs[0]
            new.name, new.shape, new.type = f"{output.name}.sliced", output.shape, output.type
            ir.convenience.replace_all_uses_with(output, new)
            start += width
        graph.remove([split, matmul], safe=True)
        rewritten += 1
    return rewritten
