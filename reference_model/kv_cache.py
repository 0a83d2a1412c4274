"""Fixed-capacity key/value cache: one buffer pair per layer, columns filled left to right.

With left padding every batch row shares the column index of a step, so one write offset serves the batch;
RoPE positions (per row) and column indices (shared) are kept apart on purpose.

An INT8 cache (`int8_scales`, one per-tensor scale per layer's keys and values, symmetric) stores
q = clamp(round_half_even(x / s), -128, 127), as ONNX QuantizeLinear with a zero point of 0, and reads q * s back.
The forward that starts the cache (the prefill) attends to its own keys and values as computed; every later
forward reads the stored columns, its own new ones included. That is what the exported graphs do: the prefill's
attention reads the projections, a step's reads the buffer it has just written.
"""

from __future__ import annotations

import torch

INT8_MIN, INT8_MAX = -128, 127  # QuantizeLinear saturates to the full int8 range


def quantize_int8(x: torch.Tensor, scale: float) -> torch.Tensor:
    return torch.clamp(torch.round(x.float() / scale), INT8_MIN, INT8_MAX).to(torch.int8)


class KVCache:
    def __init__(
        self,
        num_layers: int,
        batch: int,
        num_kv_heads: int,
        capacity: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device | str = "cpu",
        int8_scales: list[tuple[float, float]] | None = None,
    ):
        if int8_scales is not None and (
            len(int8_scales) != num_layers or not all(s > 0 for pair in int8_scales for s in pair)
        ):
            raise ValueError(f"an INT8 KV cache needs {num_layers} positive (key, value) scales, got {int8_scales}")
        shape = (batch, num_kv_heads, capacity, head_dim)
        stored = dtype if int8_scales is None else torch.int8
        self.keys = [torch.zeros(shape, dtype=stored, device=device) for _ in range(num_layers)]
        self.values = [torch.zeros(shape, dtype=stored, device=device) for _ in range(num_layers)]
        self.dtype, self.int8_scales = dtype, int8_scales
        self.capacity = capacity
        self.length = 0  # columns written so far

    def layer(self, index: int) -> _LayerWriter:
        return _LayerWriter(self, index)

    def advance(self, n: int) -> None:
        self.length += n

    def dequantized(self) -> list[torch.Tensor]:
        """Every layer's (key, value) buffers as the model's dtype: the values attention reads."""
        return [self.read(t, i // 2, i % 2) for i, t in enumerate(t for kv in zip(self.keys, self.values) for t in kv)]

    def kept_columns(self, row: int, length: int) -> list[torch.Tensor]:
        """One row's first `length` columns as stored, layer by layer (key, value): what a conversation keeps."""
        return [t[row : row + 1, :, :length].clone() for kv in zip(self.keys, self.values) for t in kv]

    def read(self, stored: torch.Tensor, layer: int, which: int) -> torch.Tensor:
        """Stored columns of `layer` (which: 0 keys, 1 values) as the model's dtype."""
        if self.int8_scales is None:
            return stored
        return (stored.float() * self.int8_scales[layer][which]).to(self.dtype)


class _LayerWriter:
    """Writes a forward's new keys/values at the cache's current length and returns everything up to them."""

    def __init__(self, cache: KVCache, index: int):
        self.cache, self.index = cache, index

    def update(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        cache = self.cache
        start, n = cache.length, k.shape[2]
        if start + n > cache.capacity:
            columns = f"{start}..{start + n - 1}"
            raise RuntimeError(f"KV cache capacity {cache.capacity} exceeded (writing columns {columns})")
        keys, values = cache.keys[self.index], cache.values[self.index]
        if cache.int8_scales is None:
            keys[:, :, start : start + n] = k
            values[:, :, start : start + n] = v
            return keys[:, :, : start + n], values[:, :, : start + n]
        k_scale, v_scale = cache.int8_scales[self.index]
        keys[:, :, start : start + n] = quantize_int8(k, k_scale)
        values[:, :, start : start + n] = quantize_int8(v, v_scale)
        if start == 0:  # the prefill: its own keys and values as computed (module docstring)
            return k, v
        end = start + n
        return cache.read(keys[:, :, :end], self.index, 0), cache.read(values[:, :, :end], self.index, 1)
