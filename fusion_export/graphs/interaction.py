"""The interaction layers' window cross-attention in the exported prefill graph.

The reference gathers each latent's w x w window out of the (s*w) x (s*w) global context (`context_windows`:
Reshape + Transpose, a copy of the context per forward) and projects the windows. With `export --plugins on` the
prefill graph instead projects the context itself (the projections are per entry, so they commute with the
gather) and calls one `fusion_export::interaction_attention` op per layer, which the exporter writes as the
InteractionAttention plugin node (engines/plugins/interaction_attention.py) with the gather + attention
decomposition as its local function: a TensorRT build with the plugin reads every window in place.
"""

from __future__ import annotations

import contextlib
import math
import types
from collections.abc import Iterator

import torch
from torch import nn

from reference_model.interaction import WindowCrossAttention


@torch.library.custom_op("fusion_export::interaction_attention", mutates_args=())
def interaction_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """q (B, s, s, heads, hd), k/v (B, s*w, s*w, heads, hd) -> (B, s, s, heads, hd)."""
    from fusion_export.plugin_ops.reference import interaction_attention_reference

    return interaction_attention_reference(q, k, v)


@interaction_attention.register_fake
def _(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    return torch.empty_like(q)


def _plugin_forward(self: WindowCrossAttention, queries: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
    """queries (B, s^2, D) and the projected context (B, (s*w)^2, D), not yet cut into windows -> (B, s^2, D)."""
    B, n, D = queries.shape
    s, side = math.isqrt(n), math.isqrt(context.shape[1])
    h, hd = self.num_heads, self.head_dim
    q = self.q_proj(queries).view(B, s, s, h, hd)
    k = self.k_proj(context).view(B, side, side, h, hd)
    v = self.v_proj(context).view(B, side, side, h, hd)
    return self.o_proj(torch.ops.fusion_export.interaction_attention(q, k, v).reshape(B, n, D))


@contextlib.contextmanager
def window_attention_plugin(model: nn.Module, on: bool = True) -> Iterator[None]:
    """While open (and `on`), every WindowCrossAttention of `model` takes the whole context in place of its windows."""
    layers = [m for m in model.modules() if isinstance(m, WindowCrossAttention)] if on else []
    for layer in layers:
        layer.forward = types.MethodType(_plugin_forward, layer)
    try:
        yield
    finally:
        for layer in layers:
            del layer.forward  # back to the class's forward


def _interaction_attention_plugin(q, k, v):
    from onnxscript.values import Opset

    from fusion_export.plugin_ops.onnx_forms import DOMAIN, INTERACTION_ATTENTION, register_schemas

    register_schemas()
    return getattr(Opset(DOMAIN, 1), INTERACTION_ATTENTION)(q, k, v)


def translation_table() -> dict:
    """custom_translation_table entry for torch.onnx.export: the plugin node (its function attached by the caller)."""
    return {torch.ops.fusion_export.interaction_attention.default: _interaction_attention_plugin}
