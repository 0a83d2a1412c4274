"""Weight-only rewrite of an artifact's graphs with INT4 blocks (int4.py) and, for the layers asked to stay 8-bit,
INT8 columns (qdq.py's form).

Every weight is quantized once from its own values (plus, with AWQ, its group's scales), so the prefill and step
graphs, which share every weight, get identical tensors and the shared data file stores each once. AWQ's 1 / s
goes where it is exact in every graph that reads the group: into the normalisation producing the input
(RMSNormalization's or LayerNormalization's scale, LayerNormalization's bias, or a Mul by a per-channel
constant) when only the group reads it; otherwise a Mul by 1 / s before the group's layers.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np
import onnx_ir as ir

from .int4 import ActivationSample, check_block_size, quantize_blocks, search_clip, search_scales
from .qdq import excluded, initializer, linear_layers, quantize_weight

LAYER_CLASSES = ("decoder", "lm_head", "vision")  # what --lm-head and --vision choose for; the rest is decoder
LAYER_FORMS = ("int4", "int8", "float")
NORMS = {"RMSNormalization": (1,), "LayerNormalization": (1, 2)}  # input indices that scale the output per channel


def layer_class(graph_name: str, weight: str) -> str:
    if graph_name == "vision_encoder":
        return "vision"
    return "lm_head" if excluded(weight, ("*lm_head*",)) else "decoder"


@dataclass(frozen=True)
class Int4Options:
    block_size: int
    method: str  # int4.METHODS
    forms: dict[str, str]  # layer class -> int4 | int8 | float
    exclude: tuple[str, ...] = ()  # weights kept float whatever their class

    def form(self, graph_name: str, weight: str) -> str:
        if excluded(weight, self.exclude):
            return "float"
        return self.forms[layer_class(graph_name, weight)]


@dataclass
class Int4Plan:
    """The decisions shared by every graph: each weight's form, and per AWQ group its 1 / s and where it goes."""

    options: Int4Options
    scale_dtype: type
    sample: ActivationSample | None = None  # awq: the calibration activations
    fold: dict[tuple[str, ...], bool] = field(default_factory=dict)  # group -> 1 / s folded into its norm
    inverse: dict[tuple[str, ...], np.ndarray] = field(default_factory=dict)  # group -> 1 / s
    input_scale: dict[str, np.ndarray] = field(default_factory=dict)  # weight -> s its rows were multiplied by
    alphas: dict[tuple[str, ...], float] = field(default_factory=dict)
    done: dict[str, tuple[str, np.ndarray, np.ndarray]] = field(default_factory=dict)  # weight -> (form, q, scale)


def _norm_input(activation: ir.Value, users: set[ir.Node]) -> tuple[ir.Node, list[int]] | None:
    """The node producing `activation` and the indices of its per-channel constants, if 1 / s can be folded into
    them: a normalisation (or a Mul by a 1-D constant) whose output only `users` read and whose constants nothing
    else reads."""
    node = activation.producer()
    if node is None or {u for u, _ in activation.uses()} != users or node.domain not in ("", "ai.onnx"):
        return None
    if node.op_type in NORMS:
        indices = [i for i in NORMS[node.op_type] if i < len(node.inputs) and node.inputs[i] is not None]
    elif node.op_type == "Mul":
        indices = [i for i, v in enumerate(node.inputs) if v is not None and v.const_value is not None
                   and len(v.const_value.shape) == 1]  # fmt: skip
        indices = indices[:1] if len(indices) == 1 else []
    else:
        return None
    constants = [node.inputs[i] for i in indices]
    if not constants or any(v.const_value is None or len(v.uses()) != 1 for v in constants):
        return None
    return node, indices


def _groups(graph: ir.Graph) -> dict[tuple[str, ...], tuple[ir.Value, set[ir.Node]]]:
    """weights sharing an input -> (that input, the MatMuls reading it)."""
    by_input: dict[int, tuple[ir.Value, list[str], set[ir.Node]]] = {}
    for layer in linear_layers(graph):
        value, names, nodes = by_input.setdefault(id(layer.activation), (layer.activation, [], set()))
        names.append(layer.weight)
        nodes.add(layer.node)
    return {tuple(sorted(set(names))): (value, nodes) for value, names, nodes in by_input.values()}


def plan_folds(plan: Int4Plan, graphs: dict[str, ir.Graph]) -> None:
    """Pass 1 over every graph: a group's 1 / s is folded only if it can be in every graph that reads it."""
    for name, graph in graphs.items():
        for key, (activation, users) in _groups(graph).items():
            if all(plan.options.form(name, w) == "int4" for w in key):
                foldable = _norm_input(activation, users) is not None
                plan.fold[key] = plan.fold.get(key, True) and foldable


def _awq_scales(plan: Int4Plan, graph: ir.Graph, key: tuple[str, ...]) -> None:
    group = plan.sample.group_of(key[0]) if plan.sample else None
    if group is None:  # never ran in calibration (cannot happen for a graph calibration ran)
        raise ValueError(f"{key[0]}: no calibration activations")
    mean, rows = plan.sample.statistics(group)
    weights = [graph.initializers[w].const_value.numpy() for w in key]
    s, alpha = search_scales(mean, rows, weights, plan.options.block_size, plan.scale_dtype)
    plan.alphas[key] = alpha
    if alpha == 0.0:
        plan.fold.pop(key, None)
        return
    plan.inverse[key] = (1.0 / s).astype(np.float32)
    for w in key:
        plan.input_scale[w] = s


def _quantize(plan: Int4Plan, form: str, name: str, weight: np.ndarray) -> tuple[str, np.ndarray, np.ndarray]:
    if name not in plan.done:
        w = weight.astype(np.float32)
        s = plan.input_scale.get(name)
        if s is not None:
            w = w * s[:, None]
        if form == "int4":
            clip = None
            if plan.options.method == "awq":
                group = plan.sample.group_of(name)
                _, rows = plan.sample.statistics(group)
                clip = search_clip(rows if s is None else rows / s, w, plan.options.block_size, plan.scale_dtype)
            q, scale = quantize_blocks(w, plan.options.block_size, clip, plan.scale_dtype)
        else:
            q, scale = quantize_weight(w, scale_dtype=plan.scale_dtype)
        plan.done[name] = (form, q, scale)
    return plan.done[name]


def _apply_inverse(plan: Int4Plan, graph: ir.Graph, key: tuple[str, ...], activation: ir.Value, users) -> None:
    inverse = plan.inverse[key]
    if plan.fold.get(key):
        node, indices = _norm_input(activation, users)  # foldable in every graph (plan_folds)
        for i in indices:
            constant = node.inputs[i].const_value
            values = constant.numpy()
            folded = (values.astype(np.float32) * inverse).astype(values.dtype)
            node.inputs[i].const_value = ir.tensor(folded, name=constant.name)
        return
    mul_inverse = initializer(graph, f"{key[0]}.awq_inverse_scale", inverse.astype(plan.scale_dtype))
    mul = ir.node("Mul", [activation, mul_inverse], name=f"{key[0]}/awq_scale")
    graph.insert_before(next(node for node in graph if node in users), mul)
    for user in users:
        user.replace_input_with(0, mul.outputs[0])


def quantize_graph_int4(plan: Int4Plan, graph_name: str, graph: ir.Graph) -> tuple[list[str], list[str]]:
    """Rewrite one graph's linear layers by the plan; returns (quantized, kept float) weight names."""
    done, kept = set(), set()
    for key, (activation, users) in _groups(graph).items():
        if plan.options.method == "awq" and all(plan.options.form(graph_name, w) == "int4" for w in key):
            if key not in plan.alphas:
                _awq_scales(plan, graph, key)
            if key in plan.inverse:
                _apply_inverse(plan, graph, key, activation, users)
    dequantized: dict[str, ir.Value] = {}
    for layer in list(linear_layers(graph)):
        name = layer.weight
        form = plan.options.form(graph_name, name)
        if form == "float":
            kept.add(name)
            continue
        if name not in dequantized:  # one DequantizeLinear per weight, however many MatMuls read it
            value = graph.initializers[name]
            if form == "int4":
                check_block_size(name, value.const_value.shape, plan.options.block_size)
            _, q, scale = _quantize(plan, form, name, value.const_value.numpy())
            if form == "int4":
                values = initializer(graph, f"{name}.int4", q.astype(ir.DataType.INT4.numpy()))
                attributes = {"axis": 0, "block_size": plan.options.block_size}
            else:
                values, attributes = initializer(graph, f"{name}.int8", q), {"axis": 1}
            dq = ir.node("DequantizeLinear", [values, initializer(graph, f"{name}.scale", scale)], attributes,
                         name=f"{name}/dequantize")  # fmt: skip
            graph.insert_before(layer.node, dq)
            dequantized[name] = dq.outputs[0]
        layer.node.replace_input_with(1, dequantized[name])
        if not graph.initializers[name].uses():
            graph.initializers.pop(name)
        done.add(name)
    return sorted(done), sorted(kept)


def weights_in(graphs: Iterable[ir.Graph]) -> set[str]:
    return {layer.weight for graph in graphs for layer in linear_layers(graph)}
