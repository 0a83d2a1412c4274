"""Explicit INT8 quantization as TensorRT reads it: Q/DQ nodes around the linear layers.

A linear layer is a MatMul whose right operand is a 2-D weight initializer (the exporter's `<param>.weight.T`,
[in, out]). Its weight becomes signed INT8 with one float32 scale per output column (symmetric, zero-point 0)
behind a DequantizeLinear on axis 1; with activations quantized too (W8A8) its left operand goes through
QuantizeLinear -> DequantizeLinear with one per-tensor scale from calibration. Weights are quantized from their
own values only, so the prefill and step graphs, which share every weight, produce identical INT8 tensors and
the shared data file still stores each weight once; an activation scale is keyed by the weight it multiplies,
so the two graphs share one set of scales too.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from reference_model.errors import FusionError

QMAX = 127  # symmetric signed INT8: [-127, 127], the range TensorRT's explicit quantization uses
MIN_SCALE = 1e-12  # an all-zero column still needs a positive scale
CLIP_RATIOS = np.linspace(1.0, 0.6, 21)  # candidate column ranges, as fractions of max |w|
DEFAULT_EXCLUDE = ("*lm_head*",)  # the vocabulary projection decides every token: kept in float by default
# W8A8: layers whose INPUT stays float (their weights are still INT8). The MLP's down projection reads
# silu(gate) * up, whose few large channels a per-tensor INT8 scale cannot hold: on the `small` preset, top-1
# agreement 91.0% with it quantized, 95.7% with its input float.
DEFAULT_FLOAT_INPUTS = ("*down_proj*",)
SMOOTHQUANT_ALPHA = 0.5  # the SmoothQuant paper's default migration strength


@dataclass(frozen=True)
class LinearLayer:
    node: ir.Node
    weight: str  # the weight initializer's name: the key shared by graphs

    @property
    def activation(self) -> ir.Value:
        return self.node.inputs[0]


def is_linear_weight(name: str, rank: int) -> bool:
    """The exporter's pre-transposed `<param>.weight.T` [in, out] right operands: the layers quantized here."""
    return rank == 2 and name.endswith(".weight.T")


def linear_layers(graph: ir.Graph) -> Iterator[LinearLayer]:
    for node in graph:
        if node.op_type != "MatMul" or node.domain not in ("", "ai.onnx"):
            continue
        weight = node.inputs[1]
        if weight is None or not weight.is_initializer() or weight.const_value is None:
            continue
        if is_linear_weight(weight.name, len(weight.const_value.shape)):
            yield LinearLayer(node, weight.name)


def excluded(name: str, patterns: Iterable[str]) -> bool:
    return any(fnmatch.fnmatchcase(name, p) for p in patterns)


def quantize_weight(
    weight: np.ndarray, clip_ratios: np.ndarray = CLIP_RATIOS, scale_dtype=np.float32
) -> tuple[np.ndarray, np.ndarray]:
    """[in, out] float -> (INT8 [in, out], scale [out] in scale_dtype, the activation dtype) per output column,
    symmetric; the values are rounded with the stored scale.

    Each column's range is clipped to the ratio of its max |w| that minimises the column's squared rounding
    error: bell-shaped weights lose less to a slightly clipped outlier than to coarser steps for every other value
    (on the `small` preset, weight-only top-1 agreement 93.8% with absmax scales, 97.3% with these)."""
    w = weight.astype(np.float32, copy=False)
    absmax = np.abs(w).max(axis=0)
    best_error = np.full(w.shape[1], np.inf, np.float32)
    best_scale = np.zeros(w.shape[1], np.float32)
    for ratio in clip_ratios:
        scale = np.maximum(absmax * ratio / QMAX, MIN_SCALE).astype(np.float32)
        error = np.square(np.clip(np.rint(w / scale), -QMAX, QMAX) * scale - w).sum(axis=0)
        better = error < best_error
        best_error[better], best_scale[better] = error[better], scale[better]
    stored = stored_scale(best_scale, scale_dtype)
    q = np.clip(np.rint(w / stored.astype(np.float32)), -QMAX, QMAX).astype(np.int8)
    return q, stored


def stored_scale(scale: np.ndarray, dtype) -> np.ndarray:
    """Scales as stored in `dtype`, kept positive: an all-zero column's tiny float32 scale would round to 0 in
    float16, and TensorRT requires every scale > 0."""
    return np.maximum(scale.astype(dtype), np.finfo(dtype).tiny)


def smoothing_factors(channel_max: np.ndarray, weight: np.ndarray, alpha: float) -> np.ndarray:
    """SmoothQuant's per-input-channel s = max|x_j|^alpha / max|W_j|^(1 - alpha): x / s and s * W have the same
    product, with the activation's outlier channels moved into the (per-column quantized) weights."""
    w_max = np.abs(weight).max(axis=1)
    s = np.power(np.maximum(channel_max, 1e-5), alpha) / np.power(np.maximum(w_max, 1e-5), 1 - alpha)
    return np.clip(s, 1e-4, 1e4).astype(np.float32)


def initializer(graph: ir.Graph, name: str, array: np.ndarray) -> ir.Value:
    """A named constant registered as one of the graph's initializers (scales, zero points, INT8 weights)."""
    value = ir.Value(name=name, const_value=ir.tensor(array, name=name))
    graph.register_initializer(value)
    return value


def quantize_graph(
    graph: ir.Graph,
    exclude: Iterable[str],
    activation_scales: dict[str, float] | None,
    float_inputs: Iterable[str] = DEFAULT_FLOAT_INPUTS,
    channel_max: dict[str, np.ndarray] | None = None,
    alpha: float = SMOOTHQUANT_ALPHA,
    scale_dtype=np.float32,
) -> tuple[list[str], list[str]]:
    """Rewrite every linear layer not excluded; activation_scales=None: weight-only, else the inputs of layers
    not matching `float_inputs` are quantized too. channel_max (per weight, its input's max |x| per channel):
    SmoothQuant on those quantized inputs, whose scales then come from the smoothed ranges. Returns (quantized,
    excluded) weight names. Scales and SmoothQuant's factors are stored in scale_dtype, the activation dtype."""
    exclude, float_inputs = tuple(exclude), tuple(float_inputs)
    done, skipped = [], []
    dequantized: dict[str, ir.Value] = {}
    zero_point = None
    for layer in list(linear_layers(graph)):
        name = layer.weight
        if excluded(name, exclude):
            skipped.append(name)
            continue
        weight_value = graph.initializers[name]
        quantize_input = activation_scales is not None and not excluded(name, float_inputs)
        smooth = smoothing_factors(channel_max[name], weight_value.const_value.numpy(), alpha) if (
            quantize_input and channel_max is not None) else None  # fmt: skip
        if name not in dequantized:  # one DequantizeLinear per weight, however many MatMuls read it
            weight = weight_value.const_value.numpy()
            weight = weight.astype(np.float32)
            q, scale = quantize_weight(weight if smooth is None else weight * smooth[:, None], scale_dtype=scale_dtype)
            dq = ir.node("DequantizeLinear", [initializer(graph, f"{name}.int8", q),
                                              initializer(graph, f"{name}.scale", scale)],
                         {"axis": 1}, name=f"{name}/dequantize")  # fmt: skip
            graph.insert_before(layer.node, dq)
            dequantized[name] = dq.outputs[0]
        layer.node.replace_input_with(1, dequantized[name])
        if quantize_input:
            if zero_point is None:
                zero_point = initializer(graph, "fusion_export.int8_zero_point", np.zeros((), np.int8))
            if name not in activation_scales:
                raise FusionError(f"{name}: no calibration range for its input (the calibration never ran it)")
            scale_name = f"{name}.input_scale"
            if scale_name not in graph.initializers:
                value = activation_scales[name]
                if smooth is not None:  # the smoothed input's range: max over channels of max|x_j| / s_j
                    value = max(float((channel_max[name] / smooth).max()) / QMAX, MIN_SCALE)
                initializer(graph, scale_name, np.array(value, scale_dtype))
            scale = graph.initializers[scale_name]
            activation = layer.activation
            if smooth is not None:
                if f"{name}.smooth" not in graph.initializers:
                    initializer(graph, f"{name}.smooth", (1.0 / smooth).astype(scale_dtype))
                inverse = graph.initializers[f"{name}.smooth"]
                mul = ir.node("Mul", [activation, inverse], name=f"{name}/{len(done)}/smooth")
                graph.insert_before(layer.node, mul)
                activation = mul.outputs[0]
            use = f"{name}/{len(done)}"
            q = ir.node("QuantizeLinear", [activation, scale, zero_point], name=f"{use}/quantize_input")
            dqa = ir.node("DequantizeLinear", [q.outputs[0], scale, zero_point], name=f"{use}/dequantize_input")
            graph.insert_before(layer.node, [q, dqa])
            layer.node.replace_input_with(0, dqa.outputs[0])
        if not weight_value.uses():
            graph.initializers.pop(name)
        done.append(name)
    return sorted(set(done)), sorted(set(skipped))


def count_qdq(graph: ir.Graph) -> dict[str, int]:
    """Q and DQ nodes of a graph: what it holds, whatever its manifest says."""
    counts = {"QuantizeLinear": 0, "DequantizeLinear": 0}
    for node in graph:
        if node.op_type in counts:
            counts[node.op_type] += 1
    return counts
