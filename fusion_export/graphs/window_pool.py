"""Adaptive max pooling as window gathers + max, which ONNX and TensorRT express with Gather and ReduceMax.

For 54 -> n with n not dividing 54 (query_len 16, 64, 144) the windows [floor(i*54/n), ceil((i+1)*54/n))
overlap and differ in length, which no stock pooling op expresses. Each window is padded to the longest one by
repeating its last index; a repeated element does not change a max.
"""

from __future__ import annotations

import torch
from torch import nn


def window_indices(in_size: int, out_size: int) -> torch.Tensor:
    """(out_size, k_max) int64 input indices of each adaptive window, padded by repetition."""
    starts = [(i * in_size) // out_size for i in range(out_size)]
    ends = [-((-(i + 1) * in_size) // out_size) for i in range(out_size)]  # ceil
    k_max = max(e - s for s, e in zip(starts, ends))
    return torch.tensor([[min(s + j, e - 1) for j in range(k_max)] for s, e in zip(starts, ends)], dtype=torch.int64)


class WindowMaxPool(nn.Module):
    """(B, H, W, D) square grid -> (B, out_size^2, D), row-major, equal to F.adaptive_max_pool2d."""

    def __init__(self, in_size: int, out_size: int):
        super().__init__()
        self.register_buffer("index", window_indices(in_size, out_size), persistent=False)

    def forward(self, grid: torch.Tensor) -> torch.Tensor:
        n, k = self.index.shape
        B, H, W, D = grid.shape
        flat = self.index.flatten()
        rows = grid.index_select(1, flat).view(B, n, k, W, D).amax(dim=2)  # (B, n, W, D)
        cols = rows.index_select(2, flat).view(B, n, n, k, D).amax(dim=3)  # (B, n, n, D)
        return cols.flatten(1, 2)
