"""The memory-bandwidth bound of a decode step: what one token must read, and the tokens/s that allows.

Per step a decoder reads every weight of its layers, the final norm and the LM head (the embedding lookup reads
one row), plus the KV columns its attention reads: the valid ones for a backend that reads only those (the
reference, onnxruntime-genai, transformers), the whole buffer for graphs that attend over a fixed capacity under a
mask. Weights and cache are counted at the run's precision: float weights from the config, quantized ones as the
graph stores them (`graph_weight_bytes`: INT8 one byte a value, INT4 half a byte, plus their scales: INT4 blocks of
32 with float32 scales read 0.625 bytes a value, blocks of 128 0.53).
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass


@dataclass(frozen=True)
class Roofline:
    weight_bytes: float
    kv_bytes: float
    bandwidths: tuple[float, ...]  # bytes/s, measured at the start of every timed round

    @property
    def bytes_per_step(self) -> float:
        return self.weight_bytes + self.kv_bytes

    @property
    def bandwidth_bytes_per_s(self) -> float:
        return statistics.median(self.bandwidths)

    @property
    def bound_tokens_per_s(self) -> float:
        return self.bandwidth_bytes_per_s / self.bytes_per_step

    def fraction(self, tokens_per_s: list[float]) -> float:
        """The median over rounds of each round's tok/s against the bound of that round's bandwidth: a shared
        machine's bandwidth drifts between rounds, and a round is held to what the machine streamed around it."""
        if len(tokens_per_s) != len(self.bandwidths):
            return statistics.median(tokens_per_s) / self.bound_tokens_per_s
        return statistics.median(t * self.bytes_per_step / bw for t, bw in zip(tokens_per_s, self.bandwidths))

    def to_json(self) -> dict:
        return {"weight_bytes": self.weight_bytes, "kv_bytes": self.kv_bytes, "bandwidths": list(self.bandwidths),
                "bandwidth_bytes_per_s": self.bandwidth_bytes_per_s, "bytes_per_step": self.bytes_per_step,
                "bound_tokens_per_s": self.bound_tokens_per_s}  # fmt: skip


def decoder_weight_values(config) -> int:
    """Weights a decode step reads: every decoder layer, the final norm, the LM head (one embedding row aside)."""
    d = config.decoder
    q, kv = d.num_heads * d.head_dim, d.num_kv_heads * d.head_dim
    layer = d.hidden_size * (q + 2 * kv) + q * d.hidden_size + 3 * d.hidden_size * d.intermediate_size
    layer += 2 * d.hidden_size  # the two RMSNorm scales
    return d.num_layers * layer + d.hidden_size + d.hidden_size * d.vocab_size


def graph_weight_bytes(path) -> int:
    """Bytes of the initializers an ONNX graph's decode step reads, as stored (external and inline, read from the
    graph's header only): 4-bit types count half a byte a value (two to a byte), block scales count as the
    tensors they are. An initializer only ever gathered from (an embedding table in a peer's graph) is left
    out: a step reads one row of it."""
    import numpy as np
    import onnx

    packed = {onnx.TensorProto.INT4, onnx.TensorProto.UINT4, onnx.TensorProto.FLOAT4E2M1}  # two values a byte
    graph = onnx.load(path, load_external_data=False).graph
    uses: dict[str, set[tuple[str, int]]] = {}
    for node in graph.node:
        for slot, name in enumerate(node.input):
            uses.setdefault(name, set()).add((node.op_type, slot))
    total = 0
    for t in graph.initializer:
        if uses.get(t.name) == {("Gather", 0)}:
            continue
        info = {e.key: e.value for e in t.external_data}
        if "length" in info:
            total += int(info["length"])
            continue
        values = int(np.prod(t.dims, dtype=np.int64))
        if t.data_type in packed:
            total += (values + 1) // 2
        else:
            total += values * np.dtype(onnx.helper.tensor_dtype_to_np_dtype(t.data_type)).itemsize
    return total


def decode_roofline(
    config,
    weight_value_bytes: float,
    kv_value_bytes: float,
    kv_columns: float,
    batch: int,
    bandwidths: list[float],
    weight_bytes: float | None = None,  # measured from the graph (quantized), else counted from the config
) -> Roofline:
    d = config.decoder
    kv = 2 * d.num_layers * d.num_kv_heads * d.head_dim * kv_columns * batch * kv_value_bytes
    weights = weight_bytes if weight_bytes is not None else decoder_weight_values(config) * weight_value_bytes
    return Roofline(weights, kv, tuple(bandwidths))
