"""Rotary tables: Phi-3.5's LongRoPE and Llama-3.1's llama3 scaling (docs/semantics.md section 7).

LongRoPE: `inv_freq = 1 / (factor_j * theta^(2j/d))` with the short factors while a forward's largest position + 1 is at
most `original_max_position_embeddings`, else the long factors; cos and sin carry the constant attention scaling.
transformers 4.48.1 re-decides on every forward, so keys cached before a conversation crossed 4096 keep their
short-factor rotation while later tokens use the long one; this module reproduces that, deciding per batch row
(upstream decides over the whole batch) so a request never depends on its batch neighbours.

llama3: one fixed table, `theta^(-2j/d)` divided by `factor` for wavelengths above original / low_freq_factor,
kept below original / high_freq_factor, interpolated between; no switch and no scaling of cos and sin.

The angle `position * inv_freq` is formed in float32 exactly as transformers does; cos/sin of that angle are
evaluated in float64 and rounded once, because multi-threaded float32 `cos` on CPU was seen to be off by 1.5e-4.
"""

from __future__ import annotations

import math
from functools import lru_cache

import torch

from .config import RopeConfig


@lru_cache(maxsize=8)
def inverse_frequencies(rope: RopeConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """(short, long) inverse frequencies, float32 [head_dim / 2], computed as transformers does."""
    exponents = torch.arange(0, rope.head_dim, 2, dtype=torch.int64).float() / rope.head_dim
    if rope.kind == "llama3":
        inv_freq = llama3_frequencies(1.0 / rope.theta**exponents, rope)
        return inv_freq, inv_freq
    short = 1.0 / (torch.tensor(rope.short_factor, dtype=torch.float32) * rope.theta**exponents)
    long = 1.0 / (torch.tensor(rope.long_factor, dtype=torch.float32) * rope.theta**exponents)
    return short, long


def llama3_frequencies(inv_freq: torch.Tensor, rope: RopeConfig) -> torch.Tensor:
    """Llama-3.1's rescaling of the default frequencies, in float32 and in transformers 4.48.1's order of
    operations (`_compute_llama3_parameters`), so the tables agree with upstream to the last bit."""
    old = rope.original_max_position_embeddings
    low_wavelen, high_wavelen = old / rope.low_freq_factor, old / rope.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / rope.factor, inv_freq)  # long wavelengths: divided
    smooth = (old / wavelen - rope.low_freq_factor) / (rope.high_freq_factor - rope.low_freq_factor)
    smoothed = (1 - smooth) * scaled / rope.factor + smooth * scaled
    medium = ~(wavelen < high_wavelen) * ~(wavelen > low_wavelen)
    return torch.where(medium, smoothed, scaled)


def _past_switch(positions: torch.Tensor, rope: RopeConfig) -> torch.Tensor:
    """positions + 1 > LongRoPE's switch, elementwise; all False for a rotation that never switches (llama3)."""
    if rope.switch_position is None:
        return torch.zeros_like(positions, dtype=torch.bool)
    return positions + 1 > rope.switch_position


def uses_long_factors(position_ids: torch.Tensor, rope: RopeConfig) -> torch.Tensor:
    """Per row: does this forward reach past the original context ([B] bool)? Never for llama3."""
    return _past_switch(position_ids.amax(dim=-1), rope)


def rope_cos_sin(position_ids: torch.Tensor, rope: RopeConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin [B, S, head_dim] float32 (on CPU) for integer positions [B, S] of one forward."""
    position_ids = position_ids.detach().to("cpu", torch.int64)
    short, long = inverse_frequencies(rope)
    inv_freq = torch.where(uses_long_factors(position_ids, rope)[:, None], long, short)  # (B, d/2)
    angles = position_ids.float()[:, :, None] * inv_freq[:, None, :]  # (B, S, d/2), one float32 rounding
    angles = torch.cat((angles, angles), dim=-1).double()  # (B, S, d): non-interleaved halves
    scale = rope.attention_scaling
    return (angles.cos() * scale).float(), (angles.sin() * scale).float()


def decode_cos_sin(position_ids: torch.Tensor, rope: RopeConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin [B, N, head_dim] for N single-token forwards at once: each position decides its own factors, as
    its own forward would (equal to rope_cos_sin(position_ids[:, j:j+1]) for every j)."""
    position_ids = position_ids.detach().to("cpu", torch.int64)
    short, long = inverse_frequencies(rope)
    inv_freq = torch.where(_past_switch(position_ids, rope)[..., None], long, short)
    angles = position_ids.float()[:, :, None] * inv_freq  # (B, N, d/2), one float32 rounding
    angles = torch.cat((angles, angles), dim=-1).double()
    scale = rope.attention_scaling
    return (angles.cos() * scale).float(), (angles.sin() * scale).float()


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x (B, heads, S, head_dim) by cos/sin (B, S, head_dim)."""
    cos, sin = cos[:, None].to(x.dtype), sin[:, None].to(x.dtype)
    return x * cos + rotate_half(x) * sin
