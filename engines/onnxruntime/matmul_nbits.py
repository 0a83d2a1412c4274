"""Weight-only quantized linear layers as ONNX Runtime's `com.microsoft.MatMulNBits`, rewritten in memory when the
CPU sessions are created.

The artifact keeps the form TensorRT reads: INT4 weights [K, N] -> DequantizeLinear (axis 0, block_size B, scales
[K/B, N]) -> MatMul, and INT8 weights [K, N] -> DequantizeLinear (axis 1, one scale per output column) -> MatMul.
ONNX Runtime 1.32's optimizer turns that form into MatMulNBits itself (DQMatMulToMatMulNBits), but not in every
session we open (measured on the demo model's INT4 export), and it fuses INT8 columns in blocks of 32, where 128
runs faster (INT8_BLOCK_SIZE):
- fp16 graphs run with the optimizer off on CPU (session.py), so each DequantizeLinear dequantizes its whole
  weight on every call;
- it leaves a DequantizeLinear read by two MatMuls (26 of the vision tower's 28 INT8 weights) as it is;
- with the decoder weights shared between sessions (prepacking off), the fused kernel dequantizes the whole weight
  on every call too: MatMulNBits is fast only on the B it prepacked.
Here every such layer is rewritten explicitly, with the accuracy level the caller chose (`ACCURACY_LEVELS`) on
every node, and the sessions that hold one keep prepacking on.

accuracy_level: 1 = float32 compute on the dequantized weights, the arithmetic of TensorRT's W4A16 (only the
weights' rounding differs from float: validation); 4 = the activations quantized to INT8 per block inside the
kernel (speed, onnxruntime-genai's CPU default: a `small` step's INT4 layers 3.4x faster than level 1 in blocks of
128, one thread; whole decode 1.85x), ~0.5-1.5% relative error per layer on real `small` activations. MatMulNBits
has no float32 kernel for 8-bit weights on x86 (MLAS): asked for level 1 it dequantizes the whole weight on every
call (195 ms against 5.9 ms for float32 weights, a `small` step's layers, one thread). So at level 1 an INT8
layer becomes a float MatMul over its weight dequantized once (the same values DequantizeLinear produces).

Operands: B uint8 [N, ceil(K/bs), bs * bits / 8] (two 4-bit values per byte, the first in the low nibble), scales
[N, ceil(K/bs)] in the activation dtype, no zero point: MatMulNBits's default 2^(bits-1), with our signed values
stored shifted by it (the same integers). An INT8 column's one scale becomes every block's scale (exactly the
same products); a K that is not a whole number of blocks gets its last block padded with zero weights. They are
built once per weight from the artifact's bytes and given to every session that reads the weight as the same
memory (`SharedOperands`: the prefill and the step read one copy); each session prepacks its own B (ONNX Runtime
shares prepacked weights only through a PrepackedWeightsContainer, which its Python API does not expose). On the
`small` preset's INT4 export (blocks of 128) the process holds 427 MB (anonymous) after loading, against 450 MB
with a copy of the operands per session (add_external_initializers) and 425 MB with ONNX Runtime's own fusion.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx_ir as ir

from .norms import MS_DOMAIN

ACCURACY_LEVELS = {1: "float32 compute", 4: "INT8 activations"}
SPEED_LEVEL = 4  # generate, bench: what onnxruntime-genai's CPU models run
# 8-bit blocks: a `small` step's layers (qkv, o, gate_up, down x 8), one thread, CPU time per step, best of 7
# rounds: 16 -> 2.40 ms, 32 -> 2.10, 64 -> 1.99, 128 -> 1.33, 256 -> 1.20 (2 runs: 128 and 256 within noise)
INT8_BLOCK_SIZE = 128
NBITS_BLOCK_SIZES = (16, 32, 64, 128, 256)  # MatMulNBits: powers of two from 16; its CPU kernels: up to 256


@dataclass
class QuantizedLayers:
    """What one graph's rewrite did (for describe()) and the new initializers its session must be given."""

    int4: int = 0  # MatMulNBits nodes by bits
    int8: int = 0
    int8_float: int = 0  # INT8 layers as float MatMuls over weights dequantized once (level 1)
    initializers: dict[str, np.ndarray] = field(default_factory=dict)  # new: handed to the session
    removed: set[str] = field(default_factory=set)  # the artifact's initializers the graph no longer reads

    @property
    def kernels(self) -> int:
        return self.int4 + self.int8

    def describe(self) -> str:
        parts = [f"{n} {kind}" for n, kind in ((self.int4, "INT4"), (self.int8, "INT8")) if n]
        text = f"{' + '.join(parts)} as MatMulNBits" if parts else ""
        if self.int8_float:
            text += (", " if text else "") + f"{self.int8_float} INT8 as float MatMul on weights dequantized once"
        return text


@dataclass(frozen=True)
class _Layer:
    """A weight-only DequantizeLinear and what the rewrite needs of it."""

    dq: ir.Node
    values: ir.Value  # INT4 / INT8 [K, N]
    scale: ir.Value  # [K / block, N] (INT4) or [N] (INT8)
    bits: int
    block_size: int  # INT4: the artifact's; INT8: INT8_BLOCK_SIZE
    matmuls: tuple[ir.Node, ...]  # every reader: MatMul(x, dq) with x not from a DequantizeLinear (not W8A8)


def _weight_only(dq: ir.Node) -> _Layer | None:
    if dq.op_type != "DequantizeLinear" or dq.domain not in ("", "ai.onnx") or len(dq.inputs) < 2:
        return None
    values, scale = dq.inputs[0], dq.inputs[1]
    if values is None or scale is None or values.const_value is None or scale.const_value is None:
        return None
    if len(dq.inputs) > 2 and dq.inputs[2] is not None:
        zero = dq.inputs[2].const_value
        if zero is None or np.any(zero.numpy().astype(np.int32) != 0):
            return None  # MatMulNBits reads unsigned values and zero points: ours are signed and symmetric
    shape = tuple(values.const_value.shape)
    if len(shape) != 2 or scale.const_value.dtype not in (ir.DataType.FLOAT, ir.DataType.FLOAT16):
        return None
    k, n = shape
    scale_shape = tuple(scale.const_value.shape)
    axis, block = dq.attributes.get_int("axis", 1), dq.attributes.get_int("block_size", 0)
    if values.const_value.dtype == ir.DataType.INT4 and axis in (0, -2) and block in NBITS_BLOCK_SIZES:
        if scale_shape != (-(-k // block), n):
            return None
        bits = 4
    elif values.const_value.dtype == ir.DataType.INT8 and axis in (1, -1) and block == 0 and scale_shape == (n,):
        bits, block = 8, INT8_BLOCK_SIZE
    else:
        return None
    output = dq.outputs[0]
    if output.is_graph_output() or not output.uses():
        return None
    matmuls = []
    for user, index in output.uses():
        if user.op_type != "MatMul" or user.domain not in ("", "ai.onnx") or index != 1:
            return None
        x = user.inputs[0].producer() if user.inputs[0] is not None else None
        if x is not None and x.op_type == "DequantizeLinear":
            return None  # W8A8: ONNX Runtime's integer kernels (or float math) run it as exported
        matmuls.append(user)
    return _Layer(dq, values, scale, bits, block, tuple(matmuls))


def nbits_operands(q: np.ndarray, scale: np.ndarray, bits: int, block_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Signed q [K, N] and its scales ([K / block, N] blocks or [N] columns) -> MatMulNBits's B uint8
    [N, blocks, block_size * bits / 8] and scales [N, blocks] (same dtype as `scale`)."""
    k, n = q.shape
    blocks = -(-k // block_size)
    zero = 1 << (bits - 1)
    shifted = np.full((blocks * block_size, n), zero, np.uint8)  # the padding dequantizes to 0
    shifted[:k] = (q.astype(np.int16) + zero).astype(np.uint8)
    b = shifted.T.reshape(n, blocks, block_size)
    if bits == 4:
        b = b[..., 0::2] | (b[..., 1::2] << 4)
    scales = np.broadcast_to(scale[:, None], (n, blocks)) if scale.ndim == 1 else scale.T
    return np.ascontiguousarray(b), np.ascontiguousarray(scales)


def _identity(tensor: ir.TensorProtocol) -> tuple:
    """Where a tensor's bytes are: the same weight in the prefill and step graphs has the same identity."""
    if isinstance(tensor, ir.ExternalTensor):
        return (str((Path(tensor.base_dir) / tensor.location).resolve()), tensor.offset, tensor.length)
    return (hashlib.sha256(tensor.tobytes()).hexdigest(),)


def _placeholder(graph: ir.Graph, name: str, array: np.ndarray, location: tuple[str, int]) -> ir.Value:
    """A new initializer, its data given to the session (SharedOperands), not serialized with the graph (a
    full-size model's would pass protobuf's 2 GB). It is declared as external data just past the end of the
    graph's own file: ONNX Runtime checks that a declared file exists before it takes the caller's value, and a
    read there would fail, never return other bytes."""
    dtype = ir.DataType.from_numpy(array.dtype)
    shape = ir.Shape(array.shape)
    tensor = ir.ExternalTensor(location[0], location[1], array.nbytes, dtype, shape=shape, name=name)
    value = ir.Value(name=name, shape=shape, type=ir.TensorType(dtype), const_value=tensor)
    graph.register_initializer(value)
    return value


class QuantizedLayerRewrite:
    """Rewrites graphs' weight-only layers for one accuracy level; operands are built once per weight (by where its
    bytes are) and shared by every graph that reads it."""

    def __init__(self, accuracy_level: int, int8_as_float: bool = False):
        if accuracy_level not in ACCURACY_LEVELS:
            raise ValueError(f"accuracy level {accuracy_level}: one of {sorted(ACCURACY_LEVELS)}")
        self.accuracy_level = accuracy_level
        # INT8 layers as float MatMuls: at level 1 (see the module doc), or when the caller wants INT8 as float math
        self.int8_as_float = int8_as_float or accuracy_level == 1
        self._built: dict[tuple, tuple[np.ndarray, ...]] = {}

    def _operands(self, layer: _Layer) -> tuple[np.ndarray, ...]:
        as_float = layer.bits == 8 and self.int8_as_float
        key = (_identity(layer.values.const_value), _identity(layer.scale.const_value), layer.bits, as_float)
        if key not in self._built:
            q = layer.values.const_value.numpy().astype(np.int8)  # INT4 arrives unpacked, one value per byte
            scale = layer.scale.const_value.numpy()
            if as_float:  # what DequantizeLinear computes: q * scale, rounded once to the scale's dtype
                self._built[key] = ((q.astype(np.float32) * scale.astype(np.float32)).astype(scale.dtype),)
            else:
                self._built[key] = nbits_operands(q, scale, layer.bits, layer.block_size)
        return self._built[key]

    def rewrite(self, graph: ir.Graph, placeholder: tuple[str, int]) -> QuantizedLayers:
        """Rewrite `graph` in place; its new initializers are declared at `placeholder` (a file name relative to
        the graph's folder and an offset past its end, see _placeholder)."""
        done = QuantizedLayers()
        for dq in [node for node in graph if node.op_type == "DequantizeLinear"]:
            layer = _weight_only(dq)
            if layer is None:
                continue
            operands = self._operands(layer)
            base = layer.values.name.removesuffix(f".int{layer.bits}")
            if len(operands) == 1:
                (weight,) = _initializers(graph, done, [f"{base}.dequantized"], operands, placeholder)
                for matmul in layer.matmuls:
                    matmul.replace_input_with(1, weight)
                done.int8_float += 1
            else:
                names = [f"{base}.nbits{layer.bits}.b", f"{base}.nbits{layer.bits}.scales"]
                b, scales = _initializers(graph, done, names, operands, placeholder)
                k, n = layer.values.const_value.shape
                attributes = {"K": k, "N": n, "bits": layer.bits, "block_size": layer.block_size,
                              "accuracy_level": self.accuracy_level}  # fmt: skip
                for i, matmul in enumerate(layer.matmuls):
                    node = ir.node("MatMulNBits", [matmul.inputs[0], b, scales], attributes, domain=MS_DOMAIN,
                                   name=f"{layer.dq.name or base}/matmul_nbits/{i}")  # fmt: skip
                    graph.insert_before(matmul, node)
                    _take_over(matmul.outputs[0], node.outputs[0])
                    graph.remove(matmul, safe=True)
                if layer.bits == 4:
                    done.int4 += 1
                else:
                    done.int8 += 1
            graph.remove(layer.dq, safe=True)
            for value in (layer.values, layer.scale):
                if not value.uses() and value.name in graph.initializers:
                    graph.initializers.pop(value.name)  # nothing loads it: not read from the file, not handed in
                    done.removed.add(value.name)
        if done.kernels:
            graph.opset_imports.setdefault(MS_DOMAIN, 1)
        return done


def rewrite_graph(
    path: Path, model: bytes | None, rewrite: QuantizedLayerRewrite
) -> tuple[bytes | None, QuantizedLayers]:
    """The graph at `path` (or `model`, its in-memory rewrite so far) with its weight-only layers rewritten,
    serialized (its other external weights still referenced by location); `model` as given when it has none."""
    import onnx

    proto = onnx.load(path, load_external_data=False) if model is None else onnx.load_from_string(model)
    if not any(node.op_type == "DequantizeLinear" for node in proto.graph.node):
        return model, QuantizedLayers()
    ir_model = ir.serde.deserialize_model(proto)
    ir.external_data.set_base_dir(ir_model.graph, path.parent)  # the artifact's bytes are read from its folder
    done = rewrite.rewrite(ir_model.graph, (path.name, path.stat().st_size))
    if not (done.kernels or done.int8_float):
        return model, done
    return ir.serde.serialize_model(ir_model).SerializeToString(), done


class SharedOperands:
    """The rewrites' new initializers as OrtValues over their arrays, one per array however many sessions read it,
    given with SessionOptions.add_initializer: the sessions read this memory (no copy), so it must live as long as
    they do (OrtModel keeps this object)."""

    def __init__(self) -> None:
        self.values: dict[int, tuple[np.ndarray, object]] = {}  # id(array) -> (array, its OrtValue)

    def hand_in(self, opts, layers: QuantizedLayers) -> None:
        import onnxruntime as ort

        for name, array in layers.initializers.items():
            if id(array) not in self.values:
                self.values[id(array)] = (array, ort.OrtValue.ortvalue_from_numpy(array))
            opts.add_initializer(name, self.values[id(array)][1])


def _initializers(
    graph: ir.Graph, done: QuantizedLayers, names: list[str], arrays, placeholder: tuple[str, int]
) -> list[ir.Value]:
    """The graph's initializers for the operands (declared once per graph, however many layers' readers use them)."""
    values = []
    for name, array in zip(names, arrays):
        value = graph.initializers.get(name)
        values.append(value if value is not None else _placeholder(graph, name, array, placeholder))
        done.initializers[name] = array
    return values


def _take_over(old: ir.Value, new: ir.Value) -> None:
    """`new` replaces `old` for every reader, as a graph output too, under its name, shape and type."""
    name = old.name
    new.shape, new.type = old.shape, old.type
    old.replace_all_uses_with(new, replace_graph_outputs=True)
    old.name, new.name = f"{name}.replaced", name
