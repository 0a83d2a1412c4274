"""Each plugin op's definition in PyTorch (what its kernel and its ONNX local function must compute),
and the window table WindowMaxPool reads."""

from __future__ import annotations

import math

import torch

from reference_model.global_context import adaptive_max_pool, context_windows


def decode_attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    start: torch.Tensor,
    end: torch.Tensor,
    k_scale: float = 1.0,
    v_scale: float = 1.0,
) -> torch.Tensor:
    B, H, T, D = q.shape
    groups = H // k.shape[1]
    kk = (k.float() * k_scale).repeat_interleave(groups, dim=1)
    vv = (v.float() * v_scale).repeat_interleave(groups, dim=1)
    scores = q.float() @ kk.transpose(-1, -2) / math.sqrt(D)  # [B, H, T, C]
    column = torch.arange(k.shape[2], device=k.device)
    last = end.long()[:, None] - T + torch.arange(T, device=k.device)[None, :]  # [B, T]: each new token's own column
    visible = (column[None, None, :] >= start.long()[:, None, None]) & (column[None, None, :] <= last[:, :, None])
    scores = scores.masked_fill(~visible[:, None], float("-inf"))
    return (scores.softmax(dim=-1) @ vv).to(q.dtype)


def interaction_attention_reference(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_scale: float = 1.0, v_scale: float = 1.0
) -> torch.Tensor:
    B, s, _, H, D = q.shape
    side = k.shape[1]
    w = side // s

    def windows(x: torch.Tensor, scale: float) -> torch.Tensor:  # (B, s^2, w^2, H, D) via the reference's gather
        flat = (x.float() * scale).reshape(B, side * side, H * D)
        return context_windows(flat, s, w).view(B, s * s, w * w, H, D)

    kw, vw = windows(k, k_scale), windows(v, v_scale)
    qf = q.float().reshape(B, s * s, 1, H, D)
    scores = torch.einsum("bnqhd,bnkhd->bnhqk", qf, kw) / math.sqrt(D)  # (B, s^2, H, 1, w^2)
    out = torch.einsum("bnhqk,bnkhd->bnqhd", scores.softmax(dim=-1), vw)  # (B, s^2, 1, H, D)
    return out.reshape(q.shape).to(q.dtype)


def window_max_pool_reference(grid: torch.Tensor, out_size: int) -> torch.Tensor:
    if grid.dtype == torch.int8:  # torch has no integer max pooling; int8 is exact in float32
        return adaptive_max_pool(grid.float(), out_size).to(torch.int8)
    return adaptive_max_pool(grid, out_size)


def window_indices(in_size: int, out_size: int) -> torch.Tensor:
    """(out_size, k_max) int64 input indices of each adaptive window, padded by repetition."""
    starts = [(i * in_size) // out_size for i in range(out_size)]
    ends = [-((-(i + 1) * in_size) // out_size) for i in range(out_size)]  # ceil
    k_max = max(e - s for s, e in zip(starts, ends))
    return torch.tensor([[min(s + j, e - 1) for j in range(k_max)] for s, e in zip(starts, ends)], dtype=torch.int64)
