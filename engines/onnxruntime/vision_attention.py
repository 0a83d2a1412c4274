"""The vision encoder's attention rewritten for ONNX Runtime's CPU kernels in memory: each SigLIP layer's eager
attention as one `com.microsoft.MultiHeadAttention` node, when the CPU sessions are created.

The shipped graph keeps the reference's eager form (reference_model/vision.py `VisionAttention.attend`), which
TensorRT parses into its own fused attention: per layer, the projections viewed as heads and transposed, `q k^T`,
the scale, the instruction rows' key mask as a `Where` with the float32 minimum, a float32 softmax, `p v`, and the
transpose back. On ONNX Runtime's CPU kernels every one of those is a pass over the (heads, queries, keys) scores
or a copy of q, k or v. MultiHeadAttention takes the projections as they come out of their MatMul (batch,
sequence, hidden) and the key mask as a (batch, keys) padding mask, and computes the same
softmax(scale q k^T + mask) v in one kernel; with the mask's fill value as its `mask_filter_value`, a masked score
is the same float32 minimum, so the softmax gives it exactly zero weight, as the graph does. One layer of the
`small` preset's text-guided tower (4 heads, 729 queries over 753 keys, batch 4, 2 threads): 32-33 ms as
exported, 16-17 ms as MultiHeadAttention, outputs equal.

The pattern is the eager attention's, matched per softmax: MatMul(q, k^T) -> Mul(scale) -> [Where(mask, fill)] ->
Softmax(last axis) -> [Cast to float] -> MatMul(., v), with q, k and v each a Reshape of a (batch, sequence,
hidden) projection into heads and a Transpose (q possibly sliced to the image rows, as the early layers' image
queries are). When all three projections end in a bias Add, the kernel takes the MatMuls' outputs and the
biases (its `bias` input) instead. A softmax that does not fit stays as exported; the form string says how many
were fused.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_ir as ir
from onnx_ir.passes.common import RemoveUnusedNodesPass

from .norms import MS_DOMAIN, small_constant

HEADS_FIRST = (0, 2, 1, 3)  # (batch, seq, heads, dim) -> (batch, heads, seq, dim), and back
KEYS_TRANSPOSED = (0, 2, 3, 1)  # (batch, seq, heads, dim) -> (batch, heads, dim, seq)


@dataclass
class _Heads:
    """A (batch, sequence, heads * dim) projection and how the graph viewed it as heads; `bias` when the
    projection is `MatMul + Add(constant vector)`, `unbiased` then being the MatMul's output."""

    projection: ir.Value
    heads: int
    dim: int
    unbiased: ir.Value | None = None
    bias: ir.Value | None = None


@dataclass
class _Attention:
    q: _Heads
    k: _Heads
    v: _Heads
    q_slice: ir.Node | None  # the image rows' slice of q (axis 2 of the heads view), if any
    scale: float
    mask: ir.Value | None  # (batch, 1, 1, keys) bool: True where a key is masked
    fill: float
    pv: ir.Node  # MatMul(p, v): its output (batch, heads, queries, dim) is what the rewrite replaces


def _scalar(value: ir.Value | None) -> float | None:
    values = small_constant(value)
    return float(values.reshape(-1)[0]) if values is not None and values.size == 1 else None


def _only_use(value: ir.Value) -> ir.Node | None:
    """The node reading `value` when it is the only reader (and `value` is no graph output)."""
    uses = list(value.uses())
    if len(uses) != 1 or value.is_graph_output():
        return None
    return uses[0][0]


def _is(node: ir.Node | None, op_type: str) -> bool:
    return node is not None and node.op_type == op_type and node.domain == ""


def _ints(value: ir.Value | None) -> list[int] | None:
    values = small_constant(value)
    return None if values is None else [int(x) for x in values.reshape(-1)]


def _heads(value: ir.Value, perm: tuple[int, ...]) -> _Heads | None:
    """The projection behind `Transpose(perm)(Reshape(projection, (batch, seq, heads, dim)))`."""
    transpose = value.producer()
    if not _is(transpose, "Transpose") or tuple(transpose.attributes.get_ints("perm", ())) != perm:
        return None
    reshape = transpose.inputs[0].producer()
    if not _is(reshape, "Reshape"):
        return None
    projection, view = reshape.inputs[0], reshape.outputs[0]
    if projection.shape is None or view.shape is None or len(projection.shape) != 3 or len(view.shape) != 4:
        return None
    heads, dim = view.shape[2], view.shape[3]
    if not isinstance(heads, int) or not isinstance(dim, int) or projection.shape[2] != heads * dim:
        return None
    if projection.dtype != ir.DataType.FLOAT:
        return None
    found = _Heads(projection, heads, dim)
    add = projection.producer()
    if _is(add, "Add"):
        for product, bias in (add.inputs, add.inputs[::-1]):
            if bias.const_value is not None and bias.shape is not None and list(bias.shape) == [heads * dim]:
                if _is(product.producer(), "MatMul"):
                    found.unbiased, found.bias = product, bias
    return found


def _match(softmax: ir.Node) -> _Attention | None:
    """The eager attention around `softmax`, or None when it is not that pattern."""
    scores = softmax.inputs[0]
    if scores.shape is None or len(scores.shape) != 4 or softmax.attributes.get_int("axis", -1) not in (-1, 3):
        return None
    mask, fill = None, None
    where = scores.producer()
    if _is(where, "Where"):
        mask, fill_value, scaled = where.inputs
        fill = _scalar(fill_value)
        if fill is None or fill > -1e30 or mask.shape is None or len(mask.shape) != 4:
            return None
        if mask.shape[1] != 1 or mask.shape[2] != 1 or mask.dtype != ir.DataType.BOOL:
            return None  # a per-key mask only (MultiHeadAttention's key padding)
        if _only_use(scaled) is not where:
            return None
    else:
        scaled = scores
    mul = scaled.producer()
    if not _is(mul, "Mul") or _only_use(scores) is not softmax:
        return None
    constants = [_scalar(v) for v in mul.inputs]
    if sum(c is not None for c in constants) != 1:
        return None
    scale = next(c for c in constants if c is not None)
    qk_out = next(v for v, c in zip(mul.inputs, constants) if c is None)
    qk = qk_out.producer()
    if not _is(qk, "MatMul") or _only_use(qk_out) is not mul:
        return None
    probs = softmax.outputs[0]
    reader = _only_use(probs)
    if _is(reader, "Cast") and reader.attributes.get_int("to") == ir.DataType.FLOAT:
        probs = reader.outputs[0]
        reader = _only_use(probs)
    if not _is(reader, "MatMul") or reader.inputs[0] is not probs:
        return None
    q_value, q_slice = qk.inputs[0], None
    if _is(q_value.producer(), "Slice"):
        q_slice = q_value.producer()
        starts, ends, axes, steps = (_ints(v) for v in [*q_slice.inputs[1:], None, None, None][:4])
        if starts is None or ends is None or axes not in ([2], [-2]) or steps not in (None, [1]):
            return None
        q_value = q_slice.inputs[0]
    q, k, v = _heads(q_value, HEADS_FIRST), _heads(qk.inputs[1], KEYS_TRANSPOSED), _heads(reader.inputs[1], HEADS_FIRST)
    if q is None or k is None or v is None or len({(h.heads, h.dim) for h in (q, k, v)}) != 1:
        return None
    return _Attention(q, k, v, q_slice, scale, mask, fill if fill is not None else 0.0, reader)


class _Writer:
    """New nodes go in front of one anchor node (every input they read is defined before it)."""

    def __init__(self, graph: ir.Graph):
        self.graph = graph

    def op(self, anchor: ir.Node, op_type: str, inputs: list, domain: str = "", **attributes) -> ir.Value:
        node = ir.node(op_type, inputs, attributes=attributes, domain=domain)
        self.graph.insert_before(anchor, node)
        return node.outputs[0]

    def const(self, anchor: ir.Node, values: list[int]) -> ir.Value:
        return self.op(anchor, "Constant", [], value=ir.tensor(np.array(values, np.int64)))


def _replace(graph: ir.Graph, found: _Attention, masks: dict[ir.Value, ir.Value]) -> None:
    w, anchor = _Writer(graph), found.pv
    heads, dim = found.q.heads, found.q.dim
    projections, bias = [h.projection for h in (found.q, found.k, found.v)], None
    if all(h.bias is not None for h in (found.q, found.k, found.v)):
        # the kernel adds the biases as it lays q, k and v out per head: three passes fewer (ONNX Runtime folds
        # the Concat of the three constants when the session is created)
        projections = [h.unbiased for h in (found.q, found.k, found.v)]
        bias = w.op(anchor, "Concat", [found.q.bias, found.k.bias, found.v.bias], axis=0)
    query, key, value = projections
    if found.q_slice is not None:  # the same rows, sliced before the heads view: axis 1 of (batch, seq, hidden)
        starts, ends = found.q_slice.inputs[1], found.q_slice.inputs[2]
        query = w.op(anchor, "Slice", [query, starts, ends, w.const(anchor, [1])])
    key_padding = None
    if found.mask is not None:
        if found.mask not in masks:  # one (batch, keys) int32 mask per distinct graph mask, 1 = attend
            keys = w.op(anchor, "Squeeze", [found.mask, w.const(anchor, [1, 2])])
            masks[found.mask] = w.op(anchor, "Cast", [w.op(anchor, "Not", [keys])], to=ir.DataType.INT32)
        key_padding = masks[found.mask]
    attributes = {"num_heads": heads, "scale": found.scale}
    if key_padding is not None:
        attributes["mask_filter_value"] = max(found.fill, float(np.finfo(np.float32).min))
    out = w.op(anchor, "MultiHeadAttention", [query, key, value, bias, key_padding], domain=MS_DOMAIN, **attributes)
    replaced = found.pv.outputs[0]
    transpose = _only_use(replaced)
    merge = None
    if _is(transpose, "Transpose") and tuple(transpose.attributes.get_ints("perm", ())) == HEADS_FIRST:
        merge = _only_use(transpose.outputs[0])
    if (
        _is(merge, "Reshape") and merge.outputs[0].shape is not None and len(merge.outputs[0].shape) == 3
    ):  # the heads merged back into (batch, queries, hidden): the kernel's own output layout
        replaced = merge.outputs[0]
    else:
        per_head = w.op(anchor, "Reshape", [out, w.const(anchor, [0, 0, heads, dim])])
        out = w.op(anchor, "Transpose", [per_head], perm=list(HEADS_FIRST))
    out.shape, out.type = replaced.shape, replaced.type
    ir.convenience.replace_all_uses_with(replaced, out)


def fuse_vision_graph(path) -> tuple[bytes | None, str]:
    """The vision encoder graph at `path` with its eager attentions as MultiHeadAttention, serialized (external
    weights still referenced by location), and the form it runs in; None when none was found."""
    import onnx

    model = ir.serde.deserialize_model(onnx.load(path, load_external_data=False))
    fused = fuse_vision_attention(model)
    if not fused:
        return None, "no eager float32 attention found"
    return ir.serde.serialize_model(model).SerializeToString(), f"{fused} attentions as MultiHeadAttention"


def fuse_vision_attention(model: ir.Model) -> int:
    """Rewrite every eager attention of the vision encoder graph as MultiHeadAttention; returns how many."""
    graph, masks, fused = model.graph, {}, 0
    for softmax in [n for n in graph if _is(n, "Softmax")]:
        found = _match(softmax)
        if found is None:
            continue
        _replace(graph, found, masks)
        fused += 1
    if fused:
        RemoveUnusedNodesPass()(model)
        model.opset_imports[MS_DOMAIN] = 1
    return fused
