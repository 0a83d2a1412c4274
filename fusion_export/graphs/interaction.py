"""The interaction layers in the exported prefill graph: any number of latent rows, and the window plugin.

Rows: the graph computes the interaction layers with no shape constant holding the number of latents (reshapes
take -1 for it, broadcasts follow the inputs), so the same nodes run on s^2 latents at a prefill and on none at a
decode step: the one decoder graph TensorRT builds for both phases (fusion_export/decoder_merge.py) binds
`vision_pos` [B, 0] and `global_ctx` [B, 0, D] when decoding, and the layers cost nothing (TensorRT runs empty
tensors). The arithmetic is the reference's, value for value.

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

from reference_model.interaction import InteractionLayer, WindowCrossAttention


def context_windows_any_rows(global_ctx: torch.Tensor, side: int, window: int) -> torch.Tensor:
    """reference_model.global_context.context_windows with the latent rows read from the data: (B, r*w * side*w, D)
    -> (B, r*side, w^2, D), r = side at a prefill, 0 at a decode step."""
    B, _, D = global_ctx.shape
    x = global_ctx.view(B, -1, window, side, window, D)  # (B, r, i, c, j, D)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(B, -1, window * window, D)


def _layer_any_rows(
    self: InteractionLayer, h: torch.Tensor, vision_pos: torch.Tensor, instruct_pos: torch.Tensor, windows
) -> torch.Tensor:
    """InteractionLayer.forward with broadcasts in place of expands to (B, n, D): n is vision_pos's own length."""
    columns = torch.zeros(1, 1, h.shape[-1], dtype=vision_pos.dtype, device=h.device)
    latent_index = vision_pos[:, :, None] + columns  # (B, n, D)
    v = torch.gather(h, 1, latent_index)
    q = torch.gather(h, 1, instruct_pos[:, :, None] + columns) + torch.zeros_like(v)  # (B, 1, D) -> (B, n, D)
    p = self.proj_in(torch.cat((q, v), dim=-1))
    a = self.norm(self.cross_attn(p, self.proj_context(windows)) + p)
    return h.scatter(1, latent_index, self.proj_out(a) + v)


def _cross_attention_any_rows(self: WindowCrossAttention, queries: torch.Tensor, windows: torch.Tensor):
    """WindowCrossAttention.forward with -1 for the number of latents."""
    B, _, w2, D = windows.shape
    h, hd = self.num_heads, self.head_dim
    q = self.q_proj(queries).view(B, -1, h, 1, hd)
    k = self.k_proj(windows).view(B, -1, w2, h, hd).transpose(2, 3)
    v = self.v_proj(windows).view(B, -1, w2, h, hd).transpose(2, 3)
    scores = torch.matmul(q, k.transpose(-1, -2)) * hd**-0.5
    out = torch.matmul(torch.softmax(scores, dim=-1), v)
    return self.o_proj(out.reshape(B, -1, D))


@contextlib.contextmanager
def any_latent_rows(model: nn.Module) -> Iterator[None]:
    """While open, the interaction layers of `model` run on whatever number of latents their inputs hold."""
    patched = [(m, _layer_any_rows) for m in model.modules() if isinstance(m, InteractionLayer)]
    patched += [(m, _cross_attention_any_rows) for m in model.modules() if isinstance(m, WindowCrossAttention)]
    for module, forward in patched:
        module.forward = types.MethodType(forward, module)
    try:
        yield
    finally:
        for module, _ in patched:
            del module.forward


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
