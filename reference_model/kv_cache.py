"""Fixed-capacity key/value cache: one buffer pair per layer, columns filled left to right.

With left padding every batch row shares the column index of a step, so one write offset serves the batch;
RoPE positions (per row) and column indices (shared) are kept apart on purpose.
"""

from __future__ import annotations

import torch


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
    ):
        shape = (batch, num_kv_heads, capacity, head_dim)
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.capacity = capacity
        self.length = 0  # columns written so far

    def layer(self, index: int) -> _LayerWriter:
        return _LayerWriter(self, index)

    def advance(self, n: int) -> None:
        self.length += n


class _LayerWriter:
    """Writes a forward's new keys/values at the cache's current length and returns everything up to them."""

    def __init__(self, cache: KVCache, index: int):
        self.cache, self.index = cache, index

    def update(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        start, n = self.cache.length, k.shape[2]
        if start + n > self.cache.capacity:
            raise RuntimeError(
                f"KV cache capacity {self.cache.capacity} exceeded (writing columns {start}..{start + n - 1})"
            )
        keys, values = self.cache.keys[self.index], self.cache.values[self.index]
        keys[:, :, start : start + n] = k
        values[:, :, start : start + n] = v
        return keys[:, :, : start + n], values[:, :, : start + n]
