"""Context-Aware Recursive Alignment: the interaction layer run after selected decoder layers at prefill.

q    = h[instruct_pos] repeated s^2 times            (B, s^2, D)   (a conversation: block k's, turn k's query)
v    = h[vision_pos]                                 (B, s^2, D)
p    = proj_in(concat(q, v))
attn = o_proj(MHA(LN(p) Wq, LN(win) Wk, LN(win) Wv))  one query per latent over its w^2 window, 16 heads
h[vision_pos] = proj_out(LayerNorm(attn + p)) + v
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .config import InteractionConfig


class WindowCrossAttention(nn.Module):
    """Each latent's single query attends to the w^2 projected context entries of its own window, unmasked."""

    def __init__(self, dim: int, num_heads: int, eps: float):
        super().__init__()
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.q_proj = nn.Sequential(nn.LayerNorm(dim, eps=eps), nn.Linear(dim, dim, bias=False))
        self.k_proj = nn.Sequential(nn.LayerNorm(dim, eps=eps), nn.Linear(dim, dim, bias=False))
        self.v_proj = nn.Sequential(nn.LayerNorm(dim, eps=eps), nn.Linear(dim, dim, bias=False))
        self.o_proj = nn.Linear(dim, dim, bias=False)

    def forward(self, queries: torch.Tensor, windows: torch.Tensor) -> torch.Tensor:
        """queries (B, n, D), windows (B, n, w2, D) -> (B, n, D)."""
        B, n, w2, D = windows.shape
        h, hd = self.num_heads, self.head_dim
        q = self.q_proj(queries).view(B, n, h, 1, hd)  # (B, n, h, 1, hd)
        k = self.k_proj(windows).view(B, n, w2, h, hd).transpose(2, 3)  # (B, n, h, w2, hd)
        v = self.v_proj(windows).view(B, n, w2, h, hd).transpose(2, 3)
        scores = torch.matmul(q, k.transpose(-1, -2)) * hd**-0.5  # (B, n, h, 1, w2)
        out = torch.matmul(F.softmax(scores, dim=-1), v)  # (B, n, h, 1, hd)
        return self.o_proj(out.reshape(B, n, D))


class GeluMlp(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.linear_1 = nn.Linear(dim, dim, bias=False)
        self.linear_2 = nn.Linear(dim, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_2(F.gelu(self.linear_1(x)))


class InteractionLayer(nn.Module):
    def __init__(self, dim: int, cfg: InteractionConfig):
        super().__init__()
        self.proj_in = nn.Linear(2 * dim, dim, bias=False)
        self.proj_context = nn.Linear(dim, dim, bias=False)
        self.cross_attn = WindowCrossAttention(dim, cfg.num_heads, cfg.layer_norm_eps)
        self.norm = nn.LayerNorm(dim, eps=cfg.layer_norm_eps)
        self.proj_out = GeluMlp(dim)

    def forward(
        self, h: torch.Tensor, vision_pos: torch.Tensor, instruct_pos: torch.Tensor, windows: torch.Tensor
    ) -> torch.Tensor:
        """h (B, S, D); vision_pos (B, n) and instruct_pos (B, m) int64 (m blocks of n/m latents, block k queried
        by instruct_pos[:, k]); windows (B, n, w2, D) -> updated h."""
        B, n = vision_pos.shape
        D, m = h.shape[-1], instruct_pos.shape[1]
        latent_index = vision_pos[:, :, None].expand(B, n, D)
        v = torch.gather(h, 1, latent_index)  # (B, n, D)
        q = torch.gather(h, 1, instruct_pos[:, :, None].expand(B, m, D))  # (B, m, D)
        q = q.expand(B, n, D) if m == 1 else q.repeat_interleave(n // m, dim=1)
        p = self.proj_in(torch.cat((q, v), dim=-1))
        a = self.norm(self.cross_attn(p, self.proj_context(windows)) + p)
        return h.scatter(1, latent_index, self.proj_out(a) + v)
