"""Adaptive max pooling as window gathers + max, which ONNX and TensorRT express with Gather and ReduceMax.

For 54 -> n with n not dividing 54 (query_len 16, 64, 144) the windows [floor(i*54/n), ceil((i+1)*54/n))
overlap and differ in length, which no stock pooling op expresses. Each window is padded to the longest one by
repeating its last index; a repeated element does not change a max.

With `export --plugins on` the pooling is one `fusion_export::window_max_pool` op instead, which the exporter
writes as the WindowMaxPool plugin node (engines/plugins/window_max_pool.py) with this decomposition as its local
function.
"""

from __future__ import annotations

import torch
from torch import nn

from ..plugin_ops.reference import window_indices


def gather_max(grid: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """(B, H, W, D) grid, (n, k) window table -> (B, n*n, D): max over rows, then over columns."""
    n, k = index.shape
    B, H, W, D = grid.shape
    flat = index.flatten()
    rows = grid.index_select(1, flat).view(B, n, k, W, D).amax(dim=2)  # (B, n, W, D)
    cols = rows.index_select(2, flat).view(B, n, n, k, D).amax(dim=3)  # (B, n, n, D)
    return cols.flatten(1, 2)


@torch.library.custom_op("fusion_export::window_max_pool", mutates_args=())
def window_max_pool(grid: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    return gather_max(grid, index)


@window_max_pool.register_fake
def _(grid, index):
    return grid.new_empty((grid.shape[0], index.shape[0] ** 2, grid.shape[3]))


def _window_max_pool_plugin(grid, index):
    from onnxscript.values import Opset

    from fusion_export.plugin_ops.onnx_forms import DOMAIN, WINDOW_MAX_POOL, register_schemas

    register_schemas()
    return getattr(Opset(DOMAIN, 1), WINDOW_MAX_POOL)(grid, index)


def translation_table() -> dict:
    """custom_translation_table entry for torch.onnx.export: the plugin node (its function attached by the caller)."""
    return {torch.ops.fusion_export.window_max_pool.default: _window_max_pool_plugin}


class WindowMaxPool(nn.Module):
    """(B, H, W, D) square grid -> (B, out_size^2, D), row-major, equal to F.adaptive_max_pool2d."""

    def __init__(self, in_size: int, out_size: int):
        super().__init__()
        self.register_buffer("index", window_indices(in_size, out_size), persistent=False)
        self.as_plugin = False  # set for the export of a --plugins on graph (onnx_export.trace)

    def forward(self, grid: torch.Tensor) -> torch.Tensor:
        if self.as_plugin:
            return window_max_pool(grid, self.index)
        return gather_max(grid, self.index)
