"""FUSION: text-guided vision encoding, sequence embedding and the decoder with interaction layers."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from .config import FusionConfig
from .decoder import CacheLayers, DecoderLayer, RMSNorm
from .global_context import adaptive_max_pool, context_windows, global_grid
from .interaction import InteractionLayer
from .kv_cache import KVCache
from .projectors import mlp2x_gelu
from .vision import VisionTower


@dataclass
class VisionOutputs:
    image_tokens: torch.Tensor  # (B, n, D): text-guided crop 4 (n = 729 or 576 tokens), for the first placeholder
    init_latents: torch.Tensor  # (B, s^2, D): pooled global grid, for the second placeholder
    global_ctx: torch.Tensor  # (B, (s*w)^2, D): pooled global grid the interaction layers read


@dataclass
class InteractionInputs:
    vision_pos: torch.Tensor  # (B, n s^2) int64 columns of the latents: n blocks (one per turn)
    instruct_pos: torch.Tensor  # (B, n) int64 column of each block's query: its turn's last prompt token
    windows: torch.Tensor  # (B, n s^2, w^2, D) each latent's slice of global_ctx (every block the same)


class FusionModel(nn.Module):
    def __init__(self, config: FusionConfig):
        super().__init__()
        self.config = config
        d, v = config.decoder, config.vision
        self.embed_tokens = nn.Embedding(d.vocab_size, d.hidden_size)
        self.vision = VisionTower(v)
        self.mm_projector = mlp2x_gelu(3 * v.hidden_size, d.hidden_size)
        self.aux_projector = mlp2x_gelu(d.hidden_size, v.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(d) for _ in range(d.num_layers))
        self.norm = RMSNorm(d.hidden_size, d.rms_norm_eps)
        self.lm_head = nn.Linear(d.hidden_size, d.vocab_size, bias=False)
        self.interaction = nn.ModuleList(
            InteractionLayer(d.hidden_size, config.interaction) for _ in range(config.interaction.num_layers)
        )
        # decoder layer index -> interaction layer that runs after it (prefill only)
        self.interaction_after = {layer: k for k, layer in enumerate(config.interaction.decoder_layers)}

    @property
    def dtype(self) -> torch.dtype:
        return self.embed_tokens.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.embed_tokens.weight.device

    def encode_instructions(
        self, pixel_values: torch.Tensor, instruct_embeds: torch.Tensor, instruct_valid: torch.Tensor
    ) -> torch.Tensor:
        """Text-guided pass over crop 4: (B, 5, 3, H, W), embedded instructions (B, T, D) and their validity
        (B, T) bool -> connector features (B, n + T, 3C)."""
        return self.vision(pixel_values[:, 4], self.aux_projector(instruct_embeds), instruct_valid)

    def encode_global(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Crops 0..3 without instructions -> the (B, 2s, 2s, D) global grid (s = patches per side: 54 or 48)."""
        B = pixel_values.shape[0]
        n = self.config.vision.num_patches
        feats = self.mm_projector(self.vision(pixel_values[:, :4].flatten(0, 1)))  # (B*4, n, D)
        return global_grid(feats.view(B, 4, n, -1))

    def encode_images(self, pixel_values: torch.Tensor, instructs: torch.Tensor, query_len: int) -> VisionOutputs:
        """(B, 5, 3, H, W) crops and (B, T) question ids (0 = padding, as upstream) -> the decoder's visual inputs."""
        return self.encode_embedded(pixel_values, self.embed_tokens(instructs), instructs != 0, query_len)

    def encode_embedded(
        self,
        pixel_values: torch.Tensor,
        instruct_embeds: torch.Tensor,
        instruct_valid: torch.Tensor,
        query_len: int,
        pool: Callable[[torch.Tensor, int], torch.Tensor] = adaptive_max_pool,
    ) -> VisionOutputs:
        """encode_images from embedded questions; `pool(grid, side)` is adaptive max pooling to side x side."""
        side = math.isqrt(self.config.check_query_len(query_len))
        n = self.config.vision.num_patches
        image_tokens = self.mm_projector(self.encode_instructions(pixel_values, instruct_embeds, instruct_valid)[:, :n])
        grid = self.encode_global(pixel_values)
        return VisionOutputs(
            image_tokens=image_tokens,
            init_latents=pool(grid, side),
            global_ctx=pool(grid, side * self.config.interaction.window_size),
        )

    def interaction_inputs(
        self, global_ctx: torch.Tensor, vision_pos: torch.Tensor, instruct_pos: torch.Tensor
    ) -> InteractionInputs:
        blocks = instruct_pos.shape[1]
        side = math.isqrt(vision_pos.shape[1] // blocks)
        windows = context_windows(global_ctx, side, self.config.interaction.window_size)
        if blocks > 1:  # a conversation: each turn's block reads the same windows
            windows = windows.repeat(1, blocks, 1, 1)
        return InteractionInputs(vision_pos=vision_pos, instruct_pos=instruct_pos, windows=windows)

    def decode(
        self,
        inputs_embeds: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        mask: torch.Tensor,
        cache: CacheLayers | None = None,
        interaction: InteractionInputs | None = None,
        hidden_states: list[torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """Decoder layers (+ interaction layers when given, i.e. at prefill) and the final norm -> (B, S, D).

        hidden_states, when a list, receives the oracle's `hidden_states_k`: the input of layer k (after the
        previous layer's interaction update), then the final normed output.
        """
        h = inputs_embeds
        for i, layer in enumerate(self.layers):
            if hidden_states is not None:
                hidden_states.append(h)
            h = layer(h, cos, sin, mask, cache.layer(i) if cache is not None else None)
            if interaction is not None and i in self.interaction_after:
                h = self.interaction[self.interaction_after[i]](
                    h, interaction.vision_pos, interaction.instruct_pos, interaction.windows
                )
        h = self.norm(h)
        if hidden_states is not None:
            hidden_states.append(h)
        return h

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        return self.lm_head(h).float()

    def new_cache(self, batch: int, capacity: int, int8_scales: list[tuple[float, float]] | None = None) -> KVCache:
        """int8_scales: per layer (key, value) scales of an INT8 cache (kv_cache.py), or None for the model's dtype."""
        d = self.config.decoder
        return KVCache(d.num_layers, batch, d.num_kv_heads, capacity, d.head_dim, self.dtype, self.device, int8_scales)
