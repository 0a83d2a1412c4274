"""Global image context from the four high-resolution crops (docs/semantics.md section 4, global pass).

The crops' s x s token grids (27 or 24 a side) are laid out 2x2 into one 2s x 2s grid (crop r*2+c at block (r, c));
adaptive max pooling then gives the s x s init latents and the (s*w) x (s*w) context the interaction layers read.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def global_grid(crop_tokens: torch.Tensor) -> torch.Tensor:
    """(B, 4, side*side, D) row-major crop tokens -> (B, 2*side, 2*side, D)."""
    B, crops, n, D = crop_tokens.shape
    side = int(round(n**0.5))
    x = crop_tokens.view(B, 2, 2, side, side, D)  # (B, crop row, crop col, y, x, D)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(B, 2 * side, 2 * side, D)


def adaptive_max_pool(grid: torch.Tensor, out_side: int) -> torch.Tensor:
    """(B, H, W, D) -> (B, out_side^2, D), row-major; windows [floor(i*H/n), ceil((i+1)*H/n))."""
    pooled = F.adaptive_max_pool2d(grid.permute(0, 3, 1, 2), (out_side, out_side))  # (B, D, n, n)
    return pooled.permute(0, 2, 3, 1).flatten(1, 2)


def context_windows(global_ctx: torch.Tensor, query_side: int, window: int) -> torch.Tensor:
    """(B, (s*w)^2, D) -> (B, s^2, w^2, D): latent (r, c) reads rows r*w.. and cols c*w.. of the context grid."""
    B, _, D = global_ctx.shape
    x = global_ctx.view(B, query_side, window, query_side, window, D)  # (B, r, i, c, j, D)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(B, query_side * query_side, window * window, D)
