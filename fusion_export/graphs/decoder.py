"""The decoder graphs: prefill (with the interaction layers) and step, over one fixed-capacity KV buffer.

Both graphs read and return the same per-layer cache buffers `[batch, kv_heads, capacity, head_dim]`, updated in
place at write columns (`kv_write`). That layout is the only one exported, because it is what TensorRT runtimes
need (a static-capacity buffer aliased between input and output, no per-step reallocation or concat copy) and
ONNX Runtime runs it at a constant cost per step with IOBinding aliasing; one layout also means one set of
graphs to validate. The cost is that attention reads the whole capacity under a mask, so runtimes size the
capacity per request (prompt + max_new_tokens). `capacity` is a dynamic dim by default; exported with a fixed one
(`--max-context N`, which TensorRT's KV-cache update requires) it is the number N in every cache shape and in the
step's attention mask, and runtimes allocate exactly N columns.

Prefill (starts a sequence at column 0; its attention reads only its own tokens):
```text
inputs_embeds                   [batch, seq, hidden]                 model dtype
attention_mask                  [batch, seq]                         int64  1 = token, 0 = left padding
rope_cos, rope_sin              [batch, seq, head_dim]               float32 LongRoPE tables from the runtime
vision_pos                      [batch, query_len]                   int64  columns of the latents
instruct_pos                    [batch, 1]                           int64  column of the last prompt token
global_ctx                      [batch, ctx, hidden]                 model dtype
past_key_values.{i}.key|value   [batch, kv_heads, capacity, head_dim] model dtype
-> logits                       [batch, vocab]                       float32 of the last column
-> present.{i}.key|value        [batch, kv_heads, capacity, head_dim] the buffers with columns 0..seq-1 written
```
Step (no interaction layer runs):
```text
inputs_embeds                   [batch, new_tokens, hidden]
attention_mask                  [batch, capacity]                    int64  1 = valid column (new ones included)
rope_cos, rope_sin              [batch, new_tokens, head_dim]        float32
write_indices                   [batch]                              int64  column of the first new token
past_key_values.{i}.key|value   [batch, kv_heads, capacity, head_dim]
-> logits                       [batch, vocab]                       float32 of the last new token
-> present.{i}.key|value        [batch, kv_heads, capacity, head_dim]
```
The prefill graph's interaction layers hold no count of latents in their nodes (traced with the latent rows
dynamic, declared with query_len's): the same nodes run on none at a decode step, which is how one decoder graph
serves both phases in one engine (fusion_export/decoder_merge.py).

RoPE cos/sin are inputs because LongRoPE switches tables per forward (docs/semantics.md section 7); the runtime
computes them with the reference's own function, so positions past 4096 are never silently wrong.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from reference_model import FusionModel
from reference_model.decoder import attention_mask
from reference_model.model import InteractionInputs

from ..graph_inputs import LOGITS, PREFILL_INPUTS, STEP_INPUTS, past_names, present_names
from .attention import use_export_attention
from .interaction import any_latent_rows, context_windows_any_rows, window_attention_plugin
from .kv_write import scatter_index  # (and registers torch.ops.fusion_export.kv_write)
from .rms_norm import use_export_norms
from .spec import GraphSpec


class BufferCache:
    """CacheLayers over graph inputs: writes each layer's new keys/values into its buffer with kv_write."""

    def __init__(self, past: tuple[torch.Tensor, ...], write_indices: torch.Tensor, attend_to_buffer: bool):
        self.past, self.write_indices, self.attend_to_buffer = past, write_indices, attend_to_buffer
        self.presents: list[torch.Tensor] = list(past)
        self.index: torch.Tensor | None = None  # kv_write's scatter index, computed once for every layer

    def layer(self, index: int) -> _BufferLayer:
        return _BufferLayer(self, index)


class _BufferLayer:
    def __init__(self, cache: BufferCache, index: int):
        self.cache, self.index = cache, index

    @property
    def decode(self) -> bool:
        """A decode step: the queries attend to the whole buffer (the export attention's cue, graphs/attention.py)."""
        return self.cache.attend_to_buffer

    def update(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        c, i = self.cache, 2 * self.index
        if c.index is None:  # a prefill writes whole rows (ScatterND); a step single columns (ScatterElements)
            c.index = scatter_index(c.write_indices, k, rows=not c.attend_to_buffer)
        rows = not c.attend_to_buffer
        c.presents[i] = torch.ops.fusion_export.kv_write(c.past[i], k, c.write_indices, c.index, rows)
        c.presents[i + 1] = torch.ops.fusion_export.kv_write(c.past[i + 1], v, c.write_indices, c.index, rows)
        return (c.presents[i], c.presents[i + 1]) if c.attend_to_buffer else (k, v)


class DecoderPrefillGraph(nn.Module):
    def __init__(self, model: FusionModel, latent_side: int):
        super().__init__()
        self.model = use_export_attention(use_export_norms(model))
        self.as_plugin = False  # set for the export of a --plugins on graph (onnx_export.trace)
        self.latent_side = latent_side  # s: latents per row of the grid (the rows are the data's)

    def forward(
        self,
        inputs_embeds: torch.Tensor,
        attention_mask_: torch.Tensor,
        rope_cos: torch.Tensor,
        rope_sin: torch.Tensor,
        vision_pos: torch.Tensor,
        instruct_pos: torch.Tensor,
        global_ctx: torch.Tensor,
        past_key_values: tuple[torch.Tensor, ...],
    ) -> tuple[torch.Tensor, ...]:
        model = self.model
        seq = inputs_embeds.shape[1]
        mask = attention_mask(attention_mask_ != 0, torch.arange(seq, device=inputs_embeds.device))
        cache = BufferCache(past_key_values, torch.zeros_like(attention_mask_[:, 0]), attend_to_buffer=False)
        if self.as_plugin:  # the InteractionAttention plugin reads each latent's window in place (graphs/interaction)
            interaction = InteractionInputs(vision_pos, instruct_pos, windows=global_ctx)
            with window_attention_plugin(model, on=True):
                h = model.decode(inputs_embeds, rope_cos, rope_sin, mask, cache, interaction)
        else:  # the interaction layers' nodes run on any number of latents, none at a decode step (graphs/interaction)
            window = model.config.interaction.window_size
            windows = context_windows_any_rows(global_ctx, self.latent_side, window)
            with any_latent_rows(model):
                h = model.decode(inputs_embeds, rope_cos, rope_sin, mask, cache,
                                 InteractionInputs(vision_pos, instruct_pos, windows))  # fmt: skip
        return (model.logits(h[:, -1]), *cache.presents)


class DecoderStepGraph(nn.Module):
    def __init__(self, model: FusionModel):
        super().__init__()
        self.model = use_export_attention(use_export_norms(model))

    def forward(
        self,
        inputs_embeds: torch.Tensor,
        attention_mask_: torch.Tensor,
        rope_cos: torch.Tensor,
        rope_sin: torch.Tensor,
        write_indices: torch.Tensor,
        past_key_values: tuple[torch.Tensor, ...],
    ) -> tuple[torch.Tensor, ...]:
        model = self.model
        new = inputs_embeds.shape[1]
        columns = write_indices[:, None] + torch.arange(new, device=inputs_embeds.device)[None]  # (B, new)
        mask = attention_mask(attention_mask_ != 0, columns)  # (B, 1, new, capacity)
        cache = BufferCache(past_key_values, write_indices, attend_to_buffer=True)
        h = model.decode(inputs_embeds, rope_cos, rope_sin, mask, cache)
        return (model.logits(h[:, -1]), *cache.presents)


def _cache_example(model: FusionModel, batch: int, capacity: int) -> tuple[torch.Tensor, ...]:
    d = model.config.decoder
    shape = (batch, d.num_kv_heads, capacity, d.head_dim)
    return tuple(torch.zeros(shape, dtype=model.dtype) for _ in range(2 * d.num_layers))


def _dims(model: FusionModel, capacity: int | None) -> tuple[torch.export.Dim, dict[int, torch.export.Dim]]:
    """The batch dim, and the cache's dynamic dims: batch and, unless it is fixed, capacity."""
    positions = model.config.decoder.rope.max_position_embeddings
    batch = torch.export.Dim("batch", max=1024)
    cache = {0: batch} if capacity else {0: batch, 2: torch.export.Dim("capacity", max=positions)}
    return batch, cache


def decoder_prefill_spec(
    model: FusionModel, query_len: int, capacity: int | None = None, plugins: bool = False
) -> GraphSpec:
    """capacity: fixed KV columns, or None for a dynamic `capacity` dim. plugins: the graph is traced for
    `--plugins on` (its interaction plugin reads whole latent rows of a fixed count)."""
    cfg = model.config
    B, S = 2, query_len + 11  # example sizes distinct from every static dim
    C = capacity or query_len + 17
    D, hd = cfg.decoder.hidden_size, cfg.decoder.head_dim
    ctx = (math.isqrt(query_len) * cfg.interaction.window_size) ** 2
    example = (
        torch.randn(B, S, D, dtype=model.dtype),
        torch.ones(B, S, dtype=torch.int64),
        torch.ones(B, S, hd),
        torch.zeros(B, S, hd),
        torch.arange(3, 3 + query_len).repeat(B, 1),
        torch.full((B, 1), S - 1, dtype=torch.int64),
        torch.randn(B, ctx, D, dtype=model.dtype),
        _cache_example(model, B, C),
    )
    batch, cache_dims = _dims(model, capacity)
    seq = torch.export.Dim("seq", max=capacity or cfg.decoder.rope.max_position_embeddings)
    n_cache = 2 * cfg.decoder.num_layers
    # traced with the latent rows dynamic, so no node holds their number (graphs/interaction.py), then declared
    # with query_len's: the artifact's prefill graph takes exactly query_len latents
    side, window = math.isqrt(query_len), cfg.interaction.window_size
    rows = torch.export.Dim("latent_rows", min=0, max=side)
    latents, context = (rows * side, rows * side * window * window) if not plugins else (None, None)
    return GraphSpec(
        name="decoder_prefill",
        module=DecoderPrefillGraph(model, side),
        example_inputs=example,
        input_names=[*PREFILL_INPUTS, *past_names(cfg.decoder.num_layers)],
        output_names=[LOGITS, *present_names(cfg.decoder.num_layers)],
        dynamic_shapes={
            "inputs_embeds": {0: batch, 1: seq},
            "attention_mask_": {0: batch, 1: seq},
            "rope_cos": {0: batch, 1: seq},
            "rope_sin": {0: batch, 1: seq},
            "vision_pos": {0: batch, 1: latents} if latents else {0: batch},
            "instruct_pos": {0: batch},
            "global_ctx": {0: batch, 1: context} if context else {0: batch},
            "past_key_values": tuple(dict(cache_dims) for _ in range(n_cache)),
        },
        weights_group="decoder",
        declared_dims={"vision_pos": {1: query_len}, "global_ctx": {1: ctx}},
    )


def decoder_step_spec(model: FusionModel, capacity: int | None = None) -> GraphSpec:
    """capacity: fixed KV columns, or None for a dynamic `capacity` dim."""
    cfg = model.config
    B, N = 2, 3  # example sizes distinct from every static dim
    C = capacity or 23
    D, hd = cfg.decoder.hidden_size, cfg.decoder.head_dim
    example = (
        torch.randn(B, N, D, dtype=model.dtype),
        torch.ones(B, C, dtype=torch.int64),
        torch.ones(B, N, hd),
        torch.zeros(B, N, hd),
        torch.full((B,), 5, dtype=torch.int64),
        _cache_example(model, B, C),
    )
    batch, cache_dims = _dims(model, capacity)
    new = torch.export.Dim("new_tokens", max=256)
    n_cache = 2 * cfg.decoder.num_layers
    return GraphSpec(
        name="decoder_step",
        module=DecoderStepGraph(model),
        example_inputs=example,
        input_names=[*STEP_INPUTS, *past_names(cfg.decoder.num_layers)],
        output_names=[LOGITS, *present_names(cfg.decoder.num_layers)],
        dynamic_shapes={
            "inputs_embeds": {0: batch, 1: new},
            "attention_mask_": {0: batch, 1: cache_dims[2]} if 2 in cache_dims else {0: batch},
            "rope_cos": {0: batch, 1: new},
            "rope_sin": {0: batch, 1: new},
            "write_indices": {0: batch},
            "past_key_values": tuple(dict(cache_dims) for _ in range(n_cache)),
        },
        weights_group="decoder",
    )
