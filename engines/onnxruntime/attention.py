"""The decoder graphs rewritten for ONNX Runtime's CPU kernels in memory, when the CPU sessions are created: a
step's KV write and attention as one `com.microsoft.GroupQueryAttention` node per layer, a prefill's attention as
causal query blocks in standard ops.

The shipped graphs keep standard ops, because TensorRT must parse them. On ONNX Runtime's CPU kernels that form
costs more than it must (measured on the `small` preset, 2 threads, 1040 positions):
- a decode step's scores `q K^T` are a matrix-vector product with the cache as the transposed operand, which
  ONNX Runtime's GEMM repacks on every call (its no-copy GEMV path takes only untransposed operands), and the
  softmax runs over the whole buffer under a mask. GroupQueryAttention writes the new keys/values into the
  shared buffer in place and attends to each row's written columns only, causally, with the padding as
  `attention_bias`. The whole attention module after its qkv projection is one kernel (RoPE inside); its
  lengths, bias and RoPE rows are graph inputs the runtime keeps on the host (`FusedStepFeeds`), so a step
  runs ~80 nodes.
- a prefill computes the scores of every head over the whole prompt, the masked upper triangle included. Cut
  into 4 blocks of queries, each attending to the keys up to its last row only (the graph's mask, sliced, as
  its bias), it does ~40% less work: one layer's attention took 17.8 ms against 31.7 ms for the whole form and
  31.1 ms for GroupQueryAttention (no faster than the full square); whole prefills' kernels 549-613 against
  630-715 ms with GroupQueryAttention (trt-10.3 graphs, three alternated ONNX Runtime profiles). The graph's
  RoPE and its scatter into the cache stay as exported, and one form serves padded and unpadded batches alike.
Either way the math is the graph's: the same softmax(q k^T / sqrt(d) + mask) v over the same columns (parity is
tested against the graphs and the reference). An INT8 cache (quantization/kv_cache.py) stays INT8: the step's
GroupQueryAttention takes the graph's per-tensor scales (k_scale / v_scale, PER_TENSOR, 8 bits; ONNX Runtime 1.32's
CPU kernel quantizes its writes and dequantizes its reads as the graph's Q/DQ do, up to one-step rounding flips),
and the prefill's blocks read the keys and values as computed, as the graph does.

The layers are found without matching op patterns: the exporter records, on every node translated from a
decoder layer's `kv_write` or attention, the region it came from (`fusion_export.region`, onnx_export.py).
Graphs without those records (exported by an older version) run unchanged. The rewrite is all or nothing: a
region it cannot read leaves the whole graph as exported.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import onnx_ir as ir
from onnx_ir.passes.common import RemoveUnusedNodesPass, TopologicalSortPass

from fusion_export.graph_inputs import past_names
from fusion_export.onnx_export import REGION_KEY

from .norms import MS_DOMAIN

PREFILL_BLOCKS = 4  # query blocks of a prefill's attention (see _blocked_layer; 8 ran no faster, with 2x the nodes)
ATTENTION_OPS = ("decode_attention", "scaled_dot_product_attention")


class NotFusable(Exception):
    """A graph this rewrite leaves as it is (the message says why)."""


# A fused step graph's own inputs, which the runtime keeps on the host and refreshes in place (FusedStepFeeds):
# computed in the graph they were ~30 small nodes per step (lengths, the bias cut to the written columns, RoPE
# tables padded to the kernel's minimum), each costing more to schedule than to run.
SEQLENS = "gqa.seqlens_k"  # (batch,) int32: each row's last written column
TOTAL = "gqa.total_sequence_length"  # () int32: the buffer's capacity, so that the bias keeps one shape
BIAS = "gqa.attention_bias"  # (batch, 1, new, capacity) float: 0 at valid columns, -inf at padding
QUERY_LENGTHS = "gqa.query_lengths"  # (batch,) int32: the step's new tokens per row
COS, SIN = "gqa.cos_cache", "gqa.sin_cache"  # (max(capacity, batch * new), head_dim / 2): this step's rows first
POSITIONS = "gqa.position_ids"  # (batch, new) int64: each token's row of those tables


class FusedStepFeeds:
    """The fused step graph's inputs as persistent arrays, refreshed from the exported graph's own step inputs
    (attention_mask, write_indices, rope_cos, rope_sin) so that a runtime binds them once, as it binds those.

    GroupQueryAttention reads each row's columns up to seqlens_k only; total_sequence_length is the capacity so
    that the bias need not change shape as the context grows (the kernel indexes the bias rows with it). Causality
    among a step's new tokens is the kernel's own; the bias carries the padding. RoPE: this step's table rows,
    first half only (Phi-3's rotate-half tables repeat their frequencies), zero rows up to the capacity (the kernel
    requires a table at least total_sequence_length long)."""

    def __init__(self, names: set[str], batch: int, new: int, capacity: int, head_dim: int):
        rows, half = max(capacity, batch * new), head_dim // 2
        arrays = {
            SEQLENS: np.zeros(batch, np.int32),
            TOTAL: np.array(capacity, np.int32),
            BIAS: np.zeros((batch, 1, new, capacity), np.float32),
            QUERY_LENGTHS: np.full(batch, new, np.int32),
            COS: np.zeros((rows, half), np.float32),
            SIN: np.zeros((rows, half), np.float32),
            POSITIONS: np.arange(batch * new, dtype=np.int64).reshape(batch, new),
        }
        self.arrays = {name: array for name, array in arrays.items() if name in names}
        self.new, self.half = new, half

    def update(self, step: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Refresh the arrays in place from one step's inputs (as `graph_inputs` prepares them); returns them."""
        a, tokens = self.arrays, self.new * len(step["write_indices"])
        a[SEQLENS][:] = step["write_indices"] + self.new - 1
        if BIAS in a:
            a[BIAS][:] = np.where(step["attention_mask"] != 0, np.float32(0), np.float32(-np.inf))[:, None, None]
        if COS in a:
            a[COS][:tokens] = step["rope_cos"][..., : self.half].reshape(tokens, self.half)
            a[SIN][:tokens] = step["rope_sin"][..., : self.half].reshape(tokens, self.half)
        return a


@dataclass
class _Layer:
    scope: str
    attention: list[ir.Node] = field(default_factory=list)
    writes: list[ir.Node] = field(default_factory=list)
    forward: list[ir.Node] = field(default_factory=list)  # the module's other ops: reshapes, RoPE


@dataclass
class _LayerIO:
    past_k: ir.Value
    past_v: ir.Value
    writes: dict  # past buffer -> (its write node, the update written)
    k_new: ir.Value  # the keys and values written (rotated)
    v_new: ir.Value
    query: ir.Value  # the attention region's inputs: rotated q; k and v as read (repeated for grouped heads)
    keys: list[ir.Value]  # one each where the region is readable (only the prefill's rewrite needs them)
    values: list[ir.Value]
    result: ir.Value  # the region's output (batch, heads, seq, head_dim)


def _regions(graph: ir.Graph) -> dict[str, _Layer]:
    layers: dict[str, _Layer] = {}
    for node in graph:
        region = node.metadata_props.get(REGION_KEY)
        if not region:
            continue
        scope, _, kind = region.rpartition("/")
        layer = layers.setdefault(scope, _Layer(scope))
        kinds = {"kv_write": layer.writes, "forward": layer.forward}
        kinds.get(kind, layer.attention if kind in ATTENTION_OPS else []).append(node)
    decoder = {scope: layer for scope, layer in layers.items() if layer.writes}  # decoder layers write the cache
    for layer in decoder.values():
        _absorb_untagged(graph, layer)
    return decoder


def _absorb_untagged(graph: ir.Graph, layer: _Layer) -> None:
    """Nodes the optimizer created inside a module (e.g. Split for split_with_sizes) carry no record: a node
    whose inputs all come from the layer's nodes (or constants) and whose outputs only they read belongs to it."""
    members = {*layer.forward, *layer.attention, *layer.writes}
    grown = True
    while grown:
        grown = False
        for node in graph:
            if node in members or node.metadata_props.get(REGION_KEY):
                continue
            inputs = [v for v in node.inputs if v is not None and v.const_value is None]
            outputs_inside = all(
                users and all(user in members for user, _ in users) and not out.is_graph_output()
                for out in node.outputs
                for users in [list(out.uses())]
            )
            if inputs and outputs_inside and all(v.producer() in members for v in inputs):
                layer.forward.append(node)
                members.add(node)
                grown = True


def _unquantized(value: ir.Value) -> ir.Value:
    producer = value.producer()
    return producer.inputs[0] if producer is not None and producer.op_type == "QuantizeLinear" else value


def _write_scale(write: ir.Node, scope: str) -> ir.Value:
    """An INT8 cache write's per-tensor scale: its QuantizeLinear's (quantization/kv_cache.py)."""
    for value in write.inputs:
        producer = value.producer() if value is not None else None
        if producer is not None and producer.op_type == "QuantizeLinear" and value.dtype == ir.DataType.INT8:
            return producer.inputs[1]
    raise NotFusable(f"{scope}: an INT8 cache write {write.name} without its QuantizeLinear")


def _ancestors(value: ir.Value, depth: int) -> set[ir.Value]:
    seen, frontier = set(), [value]
    for _ in range(depth):
        frontier = [i for v in frontier if v.producer() is not None for i in v.producer().inputs if i is not None]
        seen.update(frontier)
    return seen


class _Rewrite:
    def __init__(
        self,
        model: ir.Model,
        num_layers: int,
        num_heads: int,
        num_kv_heads: int,
        head_dim: int,
    ):
        self.model, self.graph = model, model.graph
        self.heads, self.kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.inputs = {v.name: v for v in self.graph.inputs}
        self.pasts = past_names(num_layers)
        self.layers = _regions(self.graph)
        if len(self.layers) != num_layers:
            raise NotFusable(f"{len(self.layers)} of {num_layers} decoder layers carry region records")
        self.in_attention = {node for layer in self.layers.values() for node in layer.attention}
        self.tagged = {n for layer in self.layers.values() for n in [*layer.attention, *layer.writes, *layer.forward]}
        self.step = "write_indices" in self.inputs
        # RoPE inside the kernel: a step whose layers all recorded their module's ops
        self.rotary = self.step and all(layer.forward for layer in self.layers.values())
        self.dtype = self.inputs["inputs_embeds"].dtype
        if self.dtype != ir.DataType.FLOAT:
            raise NotFusable(f"{self.dtype} graph (only float32 graphs are rewritten)")
        if self.step and head_dim % 8:  # ONNX Runtime 1.2x's CPU kernel refuses such a step when it runs
            raise NotFusable(f"head size {head_dim} (GroupQueryAttention needs a multiple of 8)")
        self.new: list[ir.Node] = []
        self.int8_cache = self.inputs[self.pasts[0]].dtype == ir.DataType.INT8

    def _node(self, op_type: str, inputs, domain: str = "", num_outputs: int = 1, **attributes) -> list[ir.Value]:
        node = ir.node(op_type, inputs, attributes=attributes, domain=domain, num_outputs=num_outputs)
        self.new.append(node)
        return list(node.outputs)

    def _op(self, op_type: str, *inputs: ir.Value, **attributes) -> ir.Value:
        return self._node(op_type, list(inputs), **attributes)[0]

    def _const(self, *values, dtype=np.int64) -> ir.Value:
        array = np.array(values[0] if len(values) == 1 else values, dtype)
        return self._op("Constant", value=ir.tensor(array))

    def _external_inputs(self, nodes: list[ir.Node]) -> list[ir.Value]:
        inside = set(nodes)
        found: list[ir.Value] = []
        for node in nodes:
            for value in node.inputs:
                if value is None or value in found or value.const_value is not None:
                    continue
                producer = value.producer()
                if producer is not None and (producer in inside or producer.op_type == "Constant"):
                    continue
                found.append(value)
        return found

    def _mask(self) -> ir.Value:
        """The graphs' boolean attention mask (batch, 1, queries, columns) that every attention region reads."""
        masks = {
            v
            for layer in self.layers.values()
            for v in self._external_inputs(layer.attention)
            if v.dtype == ir.DataType.BOOL and (v.producer() is None or v.producer() not in self.in_attention)
        }
        if len(masks) != 1:
            raise NotFusable(f"expected one boolean attention mask, found {len(masks)}")
        return masks.pop()

    def _fed_input(self, name: str, dtype: ir.DataType, shape: list) -> ir.Value:
        value = ir.Value(name=name, type=ir.TensorType(dtype), shape=ir.Shape(shape))
        self.graph.inputs.append(value)
        return value

    def _fed_step_inputs(self, rotary: bool) -> tuple[ir.Value, ir.Value, ir.Value, ir.Value, tuple | None]:
        """A step's lengths, bias and RoPE tables as graph inputs (FusedStepFeeds)."""
        batch, new = self.inputs["inputs_embeds"].shape[:2]
        capacity = self.inputs[self.pasts[0]].shape[2]
        i32 = ir.DataType.INT32
        seqlens = self._fed_input(SEQLENS, i32, [batch])
        total = self._fed_input(TOTAL, i32, [])
        bias = self._fed_input(BIAS, self.dtype, [batch, 1, new, capacity])
        query_lengths = self._fed_input(QUERY_LENGTHS, i32, [batch])
        tables = None
        if rotary:
            half = self.head_dim // 2
            cos, sin = (self._fed_input(name, self.dtype, ["rope_rows", half]) for name in (COS, SIN))
            tables = (cos, sin, self._fed_input(POSITIONS, ir.DataType.INT64, [batch, new]))
        return seqlens, total, bias, query_lengths, tables

    def _block_edges(self) -> list[ir.Value]:
        """The query blocks' edges over the prompt, 0 = e_0 < e_1 < ... < e_n = seq (1-D int64): e_i = seq * i // n."""
        seq = self._op("Shape", self.inputs["inputs_embeds"], start=1, end=2)
        inner = [self._op("Div", self._op("Mul", seq, self._const([i])), self._const([PREFILL_BLOCKS]))
                 for i in range(1, PREFILL_BLOCKS)]  # fmt: skip
        return [self._const([0]), *inner, seq]

    def _block_biases(self, edges: list[ir.Value]) -> list[ir.Value]:
        """Block i's bias, shared by every layer: the graph's mask (batch, 1, seq, seq) at rows [e_i, e_i+1) and
        columns [0, e_i+1), as log(1) = 0, log(0) = -inf (the same values as Where(mask, 0, -inf), more quickly:
        Where broadcasts its scalars element by element). The block's later columns are masked for all of its
        rows (causal), so they are left out."""
        mask, zero = self._mask(), self._const([0])
        biases = []
        for a, b in zip(edges, edges[1:]):
            starts, ends = self._op("Concat", a, zero, axis=0), self._op("Concat", b, b, axis=0)
            block = self._op("Slice", mask, starts, ends, self._const([2, 3]))
            biases.append(self._op("Log", self._op("Cast", block, to=self.dtype)))
        return biases

    def _to_bsd(self, x: ir.Value) -> ir.Value:
        """(B, heads, S, hd) -> (B, S, heads * hd), GroupQueryAttention's layout."""
        return self._op("Reshape", self._op("Transpose", x, perm=[0, 2, 1, 3]), self._const([0, 0, -1]))

    def _module_boundary(self, layer: _Layer) -> tuple[ir.Value, ir.Value]:
        """The attention module's input from its qkv projection (batch, new, (heads + 2 kv_heads) * head_dim) and
        its output to o_proj (batch, new, heads * head_dim): what crosses the layer's regions. Only float values
        count: a region may also hold shape values that other layers read (the optimizer shares them), which
        stay in the graph."""
        nodes = [*layer.forward, *layer.attention, *layer.writes]
        inputs = [
            v
            for v in self._external_inputs(nodes)
            if v.dtype == self.dtype and v not in self.graph.inputs and v.producer() not in self.tagged
        ]
        presents = {node.outputs[0] for node in layer.writes}
        outputs = [
            out
            for node in nodes
            for out in node.outputs
            if out not in presents
            and out.dtype == self.dtype
            and any(user not in self.tagged for user, _ in out.uses())
        ]
        if len(inputs) != 1 or len(outputs) != 1:
            raise NotFusable(f"{layer.scope}: {len(inputs)} projection inputs and {len(outputs)} outputs")
        return inputs[0], outputs[0]

    def _layer_io(self, layer: _Layer) -> _LayerIO:
        """What crosses a layer's attention region: its cache writes and the query, key and value it reads."""
        presents = {node.outputs[0] for node in layer.writes}
        observed = [  # e.g. a graph instrumented for calibration: the rewrite would remove what it observes
            out.name
            for node in (*layer.forward, *layer.attention, *layer.writes)
            for out in node.outputs
            if out.is_graph_output() and out not in presents
        ]
        if observed:
            raise NotFusable(f"{layer.scope}: {observed[0]} inside the attention is a graph output")
        pasts = [v for node in layer.writes for v in node.inputs if v is not None and v.name in self.pasts]
        if len(pasts) != 2:
            raise NotFusable(f"{layer.scope}: expected a key and a value buffer write, found {len(pasts)}")
        index = self.pasts.index(pasts[0].name) // 2
        past_k, past_v = (self.inputs[self.pasts[2 * index + j]] for j in (0, 1))
        writes = {}
        for node in layer.writes:
            data = [v for v in node.inputs if v in (past_k, past_v)]
            updates = [
                _unquantized(v)  # an INT8 cache's write stores QuantizeLinear(update)
                for v in node.inputs
                if v is not None and v not in (past_k, past_v) and _unquantized(v).dtype == self.dtype
            ]
            if len(data) != 1 or len(updates) != 1:
                raise NotFusable(f"{layer.scope}: unreadable KV write {node.name}")
            writes[data[0]] = (node, updates[0])
        if set(writes) != {past_k, past_v}:
            raise NotFusable(f"{layer.scope}: KV writes of {self.pasts[2 * index]} and its value not found")
        k_new, v_new = writes[past_k][1], writes[past_v][1]
        inputs = [
            v
            for v in self._external_inputs(layer.attention)
            if v.dtype == self.dtype
            and v not in presents
            and (v.producer() is None or v.producer() not in self.in_attention)
        ]
        reach = {v: _ancestors(v, 8) | {v} for v in inputs}
        queries = [v for v in inputs if not ({k_new, v_new} & reach[v])]
        if len(queries) != 1:
            raise NotFusable(f"{layer.scope}: expected one query input to the attention, found {len(queries)}")
        results = [
            out
            for node in layer.attention
            for out in node.outputs
            if any(user not in self.in_attention for user, _ in out.uses())  # graph outputs: refused above
        ]
        if len(results) != 1:
            raise NotFusable(f"{layer.scope}: the attention region has {len(results)} outputs")
        keys, values = ([v for v in inputs if new in reach[v]] for new in (k_new, v_new))
        return _LayerIO(past_k, past_v, writes, k_new, v_new, queries[0], keys, values, results[0])

    def _blocked_layer(self, layer: _Layer, edges: list[ir.Value], biases: list[ir.Value]) -> None:
        """A prefill layer's attention region as query blocks over their causal key prefixes: the graph's own
        softmax(q k^T / sqrt(d) + mask) v, row by row, without the scores of the masked upper triangle. The
        graph's RoPE and its scatter into the cache stay as exported."""
        io = self._layer_io(layer)
        if len(io.keys) != 1 or len(io.values) != 1:
            raise NotFusable(f"{layer.scope}: the attention's key and value inputs are not clear")
        key, value = io.keys[0], io.values[0]
        query = self._op("Mul", io.query, self._const(1.0 / math.sqrt(self.head_dim), dtype=np.float32))
        keys_t, zero = self._op("Transpose", key, perm=[0, 1, 3, 2]), self._const([0])
        blocks = []
        for (a, b), bias in zip(zip(edges, edges[1:]), biases):
            q_block = self._op("Slice", query, a, b, self._const([2]))
            k_block = self._op("Slice", keys_t, zero, b, self._const([3]))
            v_block = self._op("Slice", value, zero, b, self._const([2]))
            probs = self._op("Softmax", self._op("Add", self._op("MatMul", q_block, k_block), bias), axis=-1)
            blocks.append(self._op("MatMul", probs, v_block))
        ir.convenience.replace_all_uses_with(io.result, self._op("Concat", *blocks, axis=2))

    def _layer(self, layer: _Layer, seqlens, total, bias, query_lengths, tables) -> None:
        """A step layer: its KV write and attention (with RoPE, where recorded) as one GroupQueryAttention."""
        io = self._layer_io(layer)
        if tables is not None:  # the whole module after its projection: packed q|k|v in, RoPE inside the kernel
            packed, result = self._module_boundary(layer)
            qkv, cos_sin, replaced = [packed, None, None], [*tables], result
        else:  # the attention alone, on the graph's rotated q, k, v
            qkv, cos_sin, replaced = [self._to_bsd(x) for x in (io.query, io.k_new, io.v_new)], [None] * 3, io.result
        scales, quantized = [None, None], {}
        if self.int8_cache:  # the kernel quantizes its writes and dequantizes its reads with the graph's scales
            scales = [_write_scale(io.writes[past][0], layer.scope) for past in (io.past_k, io.past_v)]
            quantized = dict(k_quant_type="PER_TENSOR", v_quant_type="PER_TENSOR", kv_cache_bit_width=8)
        out, present_k, present_v = self._node(
            "GroupQueryAttention",
            # no head sink or q/k norms
            [*qkv, io.past_k, io.past_v, seqlens, total, *cos_sin, bias, None, *scales, None, None, query_lengths],
            domain=MS_DOMAIN,
            num_outputs=3,
            num_heads=self.heads,
            kv_num_heads=self.kv_heads,
            scale=1.0 / math.sqrt(self.head_dim),
            do_rotary=int(tables is not None),
            **quantized,
        )
        if tables is None:
            per_head = self._op("Reshape", out, self._const([0, 0, self.heads, self.head_dim]))
            out = self._op("Transpose", per_head, perm=[0, 2, 1, 3])
        ir.convenience.replace_all_uses_with(replaced, out)
        for present, (node, _) in ((present_k, io.writes[io.past_k]), (present_v, io.writes[io.past_v])):
            old = node.outputs[0]
            name = old.name
            ir.convenience.replace_all_uses_with(old, present, replace_graph_outputs=True)
            old.name, present.name = f"{name}.unfused", name
            present.shape, present.type = old.shape, old.type

    def run(self) -> int:
        if self.step:
            seqlens, total, bias, query_lengths, tables = self._fed_step_inputs(self.rotary)
            for layer in self.layers.values():
                self._layer(layer, seqlens, total, bias, query_lengths, tables)
        else:
            edges = self._block_edges()
            biases = self._block_biases(edges)
            for layer in self.layers.values():
                self._blocked_layer(layer, edges, biases)
        self.graph.extend(self.new)
        RemoveUnusedNodesPass()(self.model)  # the regions' nodes: nothing reads them any more
        # a step's mask, write columns and RoPE inputs now reach the kernel through FusedStepFeeds
        unread = [v for v in self.graph.inputs if not v.uses() and v.name not in self.pasts]
        for value in unread:
            self.graph.inputs.remove(value)
        TopologicalSortPass()(self.model)
        if self.step:
            self.model.opset_imports[MS_DOMAIN] = 1
        return len(self.layers)


def fuse_attention(
    path, num_layers: int, num_heads: int, num_kv_heads: int, head_dim: int, split_weights: bool = False
) -> tuple[bytes | None, str]:
    """The decoder graph at `path` rewritten for ONNX Runtime's CPU kernels (a step's attention as
    GroupQueryAttention, a prefill's as query blocks; with `split_weights`, split projections as one MatMul per
    part: ort_split_projections.py), serialized (external weights still referenced by location), or None and why
    the graph runs as exported."""
    import onnx

    from .norms import fuse_skip_norms
    from .split_projections import split_projections

    model = ir.serde.deserialize_model(onnx.load(path, load_external_data=False))
    try:
        rewrite = _Rewrite(model, num_layers, num_heads, num_kv_heads, head_dim)
        fused = rewrite.run()
    except NotFusable as reason:
        return None, str(reason)
    norms = fuse_skip_norms(model)
    if rewrite.step:
        attention = f"{fused} layers as GroupQueryAttention" + (" (RoPE inside)" if rewrite.rotary else "")
    else:
        attention = f"{fused} layers' attention in {PREFILL_BLOCKS} causal query blocks"
    form = f"{attention}, {norms} residual norms as SkipSimplifiedLayerNormalization"
    if split_weights:
        form += f", {split_projections(model)} split projections as sliced weights"
    return ir.serde.serialize_model(model).SerializeToString(), form
