"""Text-guided SigLIP / SigLIP2 tower and FUSION's feature connector (docs/semantics.md sections 4 and 1.1).

The tower runs on `concat(patch_embed + pos_embed, aux_projector(embed_tokens(instructs)))`. In the early half
of the layers, every instruction row attends uniformly to all of its request's keys: upstream overwrites those
rows' scores with the dtype minimum (an indexing slip the weights were trained with), so their softmax is flat.
Here that is written as what it computes, a mean of the values over the row's own valid keys, which equals
upstream for an unpadded request and keeps padded batch rows independent of their neighbours.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .config import VisionConfig


class PatchEmbeddings(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.patch_embedding = nn.Conv2d(cfg.num_channels, cfg.hidden_size, cfg.patch_size, stride=cfg.patch_size)
        self.position_embedding = nn.Embedding(cfg.num_patches, cfg.hidden_size)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        x = self.patch_embedding(pixel_values.to(self.patch_embedding.weight.dtype))  # (N, C, 27, 27)
        x = x.flatten(2).transpose(1, 2)  # (N, n, C): n = 729 (so400m) or 576 (giant-opt)
        return x + self.position_embedding.weight


class VisionAttention(nn.Module):
    def __init__(self, cfg: VisionConfig, uniform_instruction_rows: bool):
        super().__init__()
        self.num_heads, self.head_dim = cfg.num_heads, cfg.head_dim
        self.num_patches = cfg.num_patches
        self.uniform_instruction_rows = uniform_instruction_rows  # early layer: upstream's flat-softmax rows
        self.q_proj = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.k_proj = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.v_proj = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.out_proj = nn.Linear(cfg.hidden_size, cfg.hidden_size)

    def forward(self, x: torch.Tensor, key_valid: torch.Tensor | None) -> torch.Tensor:
        """x (N, L, C); key_valid (N, L) bool, or None when every row is a valid key (no instructions)."""
        N, L, C = x.shape
        q = self.q_proj(x).view(N, L, self.num_heads, self.head_dim).transpose(1, 2)  # (N, h, L, hd)
        k = self.k_proj(x).view(N, L, self.num_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(N, L, self.num_heads, self.head_dim).transpose(1, 2)
        if key_valid is not None and self.uniform_instruction_rows:
            n = self.num_patches
            vision_rows = self.attend(q[:, :, :n], k, v, key_valid)  # (N, h, n, hd)
            weights = key_valid.to(v.dtype) / key_valid.sum(-1, keepdim=True).to(v.dtype)  # (N, L): 1/(n+T)
            mean_v = torch.matmul(weights[:, None, None, :], v)  # (N, h, 1, hd)
            instruction_rows = mean_v.expand(N, self.num_heads, L - n, self.head_dim)
            out = torch.cat((vision_rows, instruction_rows), dim=2)  # (N, h, L, hd)
        else:
            out = self.attend(q, k, v, key_valid)
        return self.out_proj(out.transpose(1, 2).reshape(N, L, C))

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_valid: torch.Tensor | None) -> torch.Tensor:
        """Eager attention with a float32 softmax, as upstream's SigLIP computes it."""
        scores = torch.matmul(q, k.transpose(-1, -2)) * self.head_dim**-0.5  # (N, h, Lq, L)
        if key_valid is not None:
            scores = scores.masked_fill(~key_valid[:, None, None, :], torch.finfo(scores.dtype).min)
        return torch.matmul(scores.softmax(dim=-1, dtype=torch.float32).to(q.dtype), v)


class VisionMlp(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.fc1 = nn.Linear(cfg.hidden_size, cfg.intermediate_size)
        self.fc2 = nn.Linear(cfg.intermediate_size, cfg.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class VisionEncoderLayer(nn.Module):
    def __init__(self, cfg: VisionConfig, early: bool):
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.self_attn = VisionAttention(cfg, uniform_instruction_rows=early)
        self.layer_norm2 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.mlp = VisionMlp(cfg)

    def forward(self, x: torch.Tensor, key_valid: torch.Tensor | None) -> torch.Tensor:
        h = x + self.self_attn(self.layer_norm1(x), key_valid)
        return h + self.mlp(self.layer_norm2(h))


class VisionTower(nn.Module):
    """SigLIP without its last layer, head or post_layernorm; returns the connector features (N, L, 3C)."""

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.cfg = cfg
        self.embeddings = PatchEmbeddings(cfg)
        self.layers = nn.ModuleList(
            VisionEncoderLayer(cfg, early=i < cfg.num_early_layers) for i in range(cfg.num_layers)
        )

    def forward(
        self,
        pixel_values: torch.Tensor,
        instruct_states: torch.Tensor | None = None,
        instruct_valid: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """pixel_values (N, 3, H, W); instruct_states (N, T, C) and instruct_valid (N, T) bool, or both None.

        Returns concat(hs[last], mean(hs[first range]), mean(hs[second range])) over all L = n (+T) rows,
        with hs[0] the embeddings and hs[k] the output of layer k-1.
        """
        x = self.embeddings(pixel_values)  # (N, n, C): n = 729 (so400m) or 576 (giant-opt)
        key_valid = None
        if instruct_states is not None:
            x = torch.cat((x, instruct_states.to(x.dtype)), dim=1)  # (N, n + T, C)
            vision_valid = torch.ones(x.shape[0], self.cfg.num_patches, dtype=torch.bool, device=x.device)
            key_valid = torch.cat((vision_valid, instruct_valid.to(torch.bool)), dim=1)

        first, second = self.cfg.connector_ranges
        sum_first, sum_second = torch.zeros_like(x), torch.zeros_like(x)
        for k in range(self.cfg.num_layers + 1):  # hs[k]: k = 0 embeddings, then each layer's output
            if k > 0:
                x = self.layers[k - 1](x, key_valid)
            if k in first:
                sum_first = sum_first + x
            if k in second:
                sum_second = sum_second + x
        return torch.cat((x, sum_first / len(first), sum_second / len(second)), dim=-1)
