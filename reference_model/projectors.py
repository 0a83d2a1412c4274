"""FUSION's two projectors (`mlp2x_gelu`): Linear, exact GELU, Linear; indices 0 and 2 as in checkpoints."""

from __future__ import annotations

from torch import nn


def mlp2x_gelu(in_features: int, out_features: int) -> nn.Sequential:
    """mm_projector: 3 x vision width -> LLM width; aux_projector: LLM width -> vision width."""
    return nn.Sequential(nn.Linear(in_features, out_features), nn.GELU(), nn.Linear(out_features, out_features))
