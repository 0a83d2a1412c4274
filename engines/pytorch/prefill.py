"""The prefill with the plugin kernels in place of their reference ops: window max pooling of the global grid and
the interaction layers' window attention reading each window in place from the projected context.

The projections in front of the window attention act on each context entry alone, so they commute with cutting
the context into windows: projecting the (s*w)^2 entries once and letting the kernel read latent (r, c)'s window
where it lies equals the reference's gather-then-project (`reference_model/interaction.py`), without its
(B, s^2, w^2, D) copy. Without kernels the prefill is the reference's own code.
"""

from __future__ import annotations

import math

import torch

from engines.plugins.interaction_attention import interaction_attention
from engines.plugins.window_max_pool import window_max_pool
from reference_model.decoder import CacheLayers
from reference_model.interaction import InteractionLayer
from reference_model.model import FusionModel, VisionOutputs


def encode_images(model: FusionModel, pixel_values, instructs, query_len: int, kernels: bool) -> VisionOutputs:
    if not kernels:
        return model.encode_images(pixel_values, instructs, query_len)
    embeds = model.embed_tokens(instructs)
    return model.encode_embedded(pixel_values, embeds, instructs != 0, query_len, pool=window_max_pool)


def interaction_forward(
    layer: InteractionLayer, h: torch.Tensor, vision_pos: torch.Tensor, instruct_pos: torch.Tensor, global_ctx
) -> torch.Tensor:
    """InteractionLayer.forward with the context projected whole and the window attention as the kernel;
    global_ctx (B, (s*w)^2, D) un-windowed. A conversation's m blocks each read the same context."""
    B, n = vision_pos.shape
    D, m = h.shape[-1], instruct_pos.shape[1]
    latent_index = vision_pos[:, :, None].expand(B, n, D)
    v = torch.gather(h, 1, latent_index)
    q = torch.gather(h, 1, instruct_pos[:, :, None].expand(B, m, D))
    q = q.expand(B, n, D) if m == 1 else q.repeat_interleave(n // m, dim=1)
    p = layer.proj_in(torch.cat((q, v), dim=-1))
    attn = layer.cross_attn
    heads, hd = attn.num_heads, attn.head_dim
    s, side = math.isqrt(n // m), math.isqrt(global_ctx.shape[1])
    context = layer.proj_context(global_ctx)
    keys = attn.k_proj(context).view(B, 1, side, side, heads, hd).expand(B, m, side, side, heads, hd)
    values = attn.v_proj(context).view(B, 1, side, side, heads, hd).expand(B, m, side, side, heads, hd)
    shape = (B * m, side, side, heads, hd)
    out = interaction_attention(attn.q_proj(p).view(B * m, s, s, heads, hd), keys.reshape(shape),
                                values.reshape(shape))  # fmt: skip
    a = layer.norm(attn.o_proj(out.reshape(B, n, D)) + p)
    return h.scatter(1, latent_index, layer.proj_out(a) + v)


def decode_prefill(
    model: FusionModel,
    embeds: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    mask: torch.Tensor,
    cache: CacheLayers,
    vision_pos: torch.Tensor,
    instruct_pos: torch.Tensor,
    global_ctx: torch.Tensor,
) -> torch.Tensor:
    """FusionModel.decode at a prefill, the interaction layers through `interaction_forward` -> (B, S, D)."""
    h = embeds
    for i, layer in enumerate(model.layers):
        h = layer(h, cos, sin, mask, cache.layer(i))
        if i in model.interaction_after:
            h = interaction_forward(model.interaction[model.interaction_after[i]], h, vision_pos, instruct_pos,
                                    global_ctx)  # fmt: skip
    return model.norm(h)
