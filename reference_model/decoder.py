"""Decoder layers of Phi-3.5-mini and Llama-3.1 alike (fused qkv and gate_up projections, RMSNorm, grouped-query
attention, rotary embeddings, no biases; a Llama checkpoint's separate projections are stacked on load)."""

from __future__ import annotations

from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

from .config import DecoderConfig
from .rope import apply_rope


class LayerCache(Protocol):
    """Where a layer's keys/values go: returns every key/value the new queries may attend to."""

    def update(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]: ...


class CacheLayers(Protocol):
    """A KV cache as the decoder sees it: one LayerCache per layer."""

    def layer(self, index: int) -> LayerCache: ...


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)  # normalise in float32
        return self.weight * x32.to(x.dtype)


class Attention(nn.Module):
    def __init__(self, cfg: DecoderConfig):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        q_size, kv_size = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
        self.qkv_proj = nn.Linear(cfg.hidden_size, q_size + 2 * kv_size, bias=False)  # rows: q, k, v
        self.o_proj = nn.Linear(q_size, cfg.hidden_size, bias=False)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        mask: torch.Tensor,
        cache: LayerCache | None,
    ) -> torch.Tensor:
        """x (B, S, D); cos/sin (B, S, hd); mask (B, 1, S, K) bool, True = may attend."""
        B, S, _ = x.shape
        q_size, kv_size = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        q, k, v = self.qkv_proj(x).split((q_size, kv_size, kv_size), dim=-1)
        q = q.view(B, S, self.num_heads, self.head_dim).transpose(1, 2)  # (B, h, S, hd)
        k = k.view(B, S, self.num_kv_heads, self.head_dim).transpose(1, 2)  # (B, kvh, S, hd)
        v = v.view(B, S, self.num_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            k, v = cache.update(k, v)  # (B, kvh, K, hd)
        groups = self.num_heads // self.num_kv_heads
        if groups > 1:
            k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # (B, h, S, hd), scale 1/sqrt(hd)
        return self.o_proj(out.transpose(1, 2).reshape(B, S, -1))


class GatedMlp(nn.Module):
    def __init__(self, cfg: DecoderConfig):
        super().__init__()
        self.gate_up_proj = nn.Linear(cfg.hidden_size, 2 * cfg.intermediate_size, bias=False)  # rows: gate, up
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        return self.down_proj(up * F.silu(gate))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: DecoderConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = GatedMlp(cfg)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        mask: torch.Tensor,
        cache: LayerCache | None = None,
    ) -> torch.Tensor:
        h = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, cache)
        return h + self.mlp(self.post_attention_layernorm(h))


def attention_mask(key_valid: torch.Tensor, query_columns: torch.Tensor) -> torch.Tensor:
    """(B, 1, S, K) bool: query at cache column c sees valid keys at columns <= c, and always itself.

    key_valid (B, K) marks non-padding columns; query_columns (S,) or per row (B, S) are the queries' columns.
    Letting a padding query see itself keeps its softmax finite; its output is never read.
    """
    keys = torch.arange(key_valid.shape[1], device=key_valid.device)[None, None, :]  # (1, 1, K)
    queries = (query_columns if query_columns.dim() == 2 else query_columns[None])[:, :, None]  # (B|1, S, 1)
    causal = keys <= queries
    itself = keys == queries
    return (causal & (key_valid[:, None, :] | itself))[:, None]
