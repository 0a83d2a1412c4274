"""What the runtime feeds the exported graphs: the host-side preparation every graph backend shares
(the names it fills: fusion_export/graph_inputs.py).

The graphs leave to the runtime what is cheap on the host and awkward in a graph: the token-embedding gather
(one table, stored once), scattering image tokens and latents into the prompt, the LongRoPE tables (decided per
forward, docs/semantics.md section 7), the attention masks and the KV write columns. ONNX Runtime and TensorRT
backends call the same functions, so they place every token exactly as the reference does.

Light on purpose: numpy and the reference's RoPE function only, never the exporter.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch

from reference_model.conversation import ChunkLayout
from reference_model.generation import DecodeState, GenerationError
from reference_model.rope import decode_cos_sin, rope_cos_sin
from reference_model.sequence import PreparedBatch


def cache_as_float(arrays: list[np.ndarray], int8_scales: list[tuple[float, float]] | None) -> list[np.ndarray]:
    """A backend's KV buffers (layer by layer, key then value) as the float values attention reads: an INT8
    cache's q * scale (DequantizeLinear's arithmetic, exact in float32), a float cache as it is."""
    if int8_scales is None:
        return arrays
    return [a.astype(np.float32) * np.float32(int8_scales[i // 2][i % 2]) for i, a in enumerate(arrays)]


def _rope(position_ids: torch.Tensor, rope) -> tuple[np.ndarray, np.ndarray]:
    cos, sin = rope_cos_sin(position_ids, rope)
    return cos.numpy(), sin.numpy()


def refuse_several_turns(batch: PreparedBatch) -> None:
    """The prefill graphs query one latent block per row: a whole conversation as one request (several blocks) is
    the reference's definition; graph backends take its later turns as follow-ups (reference_model/conversation.py)."""
    if batch.layout.instruct_pos.shape[1] != 1:
        raise GenerationError(
            f"a request of {batch.layout.instruct_pos.shape[1]} turns in one prefill: the exported graphs take one "
            "turn per prefill; continue a conversation turn by turn (Pipeline.conversation)"
        )


def vision_inputs(batch: PreparedBatch, embed_table: np.ndarray) -> dict[str, np.ndarray]:
    """The vision encoder's inputs: crops, the question's embeddings from the shared table, its padding mask."""
    instructs = batch.instructs.numpy()
    return {
        "pixel_values": np.ascontiguousarray(batch.pixel_values.numpy()),
        "instruct_embeds": embed_table[instructs],
        "instruct_mask": (instructs != 0).astype(np.int64),
    }


def prefill_inputs(
    batch: PreparedBatch,
    embed_table: np.ndarray,
    image_tokens: np.ndarray,
    init_latents: np.ndarray,
    global_ctx: np.ndarray,
    rope,
) -> dict[str, np.ndarray]:
    """The prefill's inputs (KV buffers aside): the prompt embedded with the image tokens at the first
    placeholder's columns and the latents at the second's (docs/semantics.md section 5)."""
    layout = batch.layout
    embeds = embed_table[layout.text_ids.numpy()]
    for columns, rows in ((layout.image_columns, image_tokens), (layout.vision_pos, init_latents)):
        np.put_along_axis(embeds, columns.numpy()[:, :, None], rows.astype(embeds.dtype), axis=1)
    cos, sin = _rope(layout.position_ids, rope)
    return {
        "inputs_embeds": embeds,
        "attention_mask": layout.attention_mask.numpy().astype(np.int64),
        "rope_cos": cos,
        "rope_sin": sin,
        "vision_pos": layout.vision_pos.numpy(),
        "instruct_pos": layout.instruct_pos.numpy(),
        "global_ctx": global_ctx,
    }


class StepFeeds:
    """The step graph's inputs as persistent host arrays, refreshed in place at each step, so a runtime binds them
    once. RoPE rows are computed up front for every position the session can reach (`decode_cos_sin`: the same
    numbers as one `rope_cos_sin` per step); the valid-column mask is kept as the graph's int64 and one column is
    set per step. Same values as `step_inputs`, without a per-step allocation or table computation."""

    def __init__(self, state: DecodeState, embed_table: np.ndarray, rope, max_new_tokens: int):
        self.state, self.embed_table = state, embed_table
        batch = state.key_valid.shape[0]
        ahead = state.positions[:, None] + torch.arange(1, max_new_tokens + 1)  # (B, N) positions of later steps
        cos, sin = decode_cos_sin(ahead, rope)
        self.cos, self.sin = cos.numpy(), sin.numpy()
        self.arrays = {
            "inputs_embeds": np.zeros((batch, 1, embed_table.shape[1]), dtype=embed_table.dtype),
            "attention_mask": state.key_valid.numpy().astype(np.int64),
            "rope_cos": np.zeros((batch, 1, self.cos.shape[-1]), dtype=np.float32),
            "rope_sin": np.zeros((batch, 1, self.sin.shape[-1]), dtype=np.float32),
            "write_indices": np.zeros((batch,), dtype=np.int64),
        }
        self.steps = 0

    def advance(self, tokens: torch.Tensor) -> dict[str, np.ndarray]:
        """Advance the state by one column and write that step's inputs into the arrays (returned)."""
        self.state.advance()
        column, step = self.state.length - 1, self.steps
        a = self.arrays
        a["inputs_embeds"][:, 0] = self.embed_table[tokens.numpy()]
        a["attention_mask"][:, column] = 1
        a["rope_cos"][:, 0], a["rope_sin"][:, 0] = self.cos[:, step], self.sin[:, step]
        a["write_indices"][:] = column
        self.steps += 1
        return a


def step_inputs(tokens: torch.Tensor, state: DecodeState, embed_table: np.ndarray, rope) -> dict[str, np.ndarray]:
    """One decode step's inputs: advances `state` by one column and returns the new token's embedding, the
    valid columns of the whole buffer, its RoPE tables and the column it is written to."""
    positions = state.advance()
    cos, sin = _rope(positions, rope)
    batch = tokens.shape[0]
    return {
        "inputs_embeds": embed_table[tokens.numpy()[:, None]],
        "attention_mask": state.key_valid.numpy().astype(np.int64),
        "rope_cos": cos,
        "rope_sin": sin,
        "write_indices": np.full((batch,), state.length - 1, dtype=np.int64),
    }


def follow_up_feeds(
    chunks: list[ChunkLayout], state: DecodeState, embed_table: np.ndarray, vision, rope
) -> Iterator[dict[str, np.ndarray]]:
    """The one decoder graph's feeds for a conversation's later turn (fusion_export/decoder_merge.py), chunk by
    chunk, each after `state` was extended by it: the chunk is a step of its tokens written after the kept columns
    (the mask: every valid column, the chunk's included), its block's latents and query given to the interaction
    layers (reference_model/conversation.py). `vision`: the kept VisionOutputs (init latents, context grid)."""
    latents, context = np.asarray(vision.init_latents), np.asarray(vision.global_ctx)
    for chunk in chunks:
        state.extend(chunk.text_ids.shape[1])
        embeds = embed_table[chunk.text_ids.numpy()]
        np.put_along_axis(embeds, chunk.vision_pos.numpy()[:, :, None], latents.astype(embeds.dtype), axis=1)
        cos, sin = _rope(chunk.position_ids, rope)
        yield {
            "inputs_embeds": embeds,
            "attention_mask": state.key_valid.numpy().astype(np.int64),
            "rope_cos": cos,
            "rope_sin": sin,
            "write_indices": np.array([chunk.start], dtype=np.int64),
            "vision_pos": chunk.vision_pos.numpy(),
            "instruct_pos": chunk.instruct_pos.numpy(),
            "global_ctx": context,
        }


def decoder_prefill_inputs(prefill: dict[str, np.ndarray], capacity: int) -> dict[str, np.ndarray]:
    """The one decoder graph's prefill feeds (fusion_export/decoder_merge.py) from the prefill graph's: the prompt
    is a step of `seq` new tokens written at column 0, its mask the first `seq` of `capacity` valid columns."""
    mask = prefill["attention_mask"]
    batch, seq = mask.shape
    columns = np.zeros((batch, capacity), dtype=np.int64)
    columns[:, :seq] = mask
    return {**prefill, "attention_mask": columns, "write_indices": np.zeros((batch,), dtype=np.int64)}


def decoder_step_inputs(step: dict[str, np.ndarray], hidden_size: int, dtype) -> dict[str, np.ndarray]:
    """The one decoder graph's step feeds from the step graph's: no latents and no context grid, so its
    interaction layers compute nothing; the instruction column 0 is one every step has (never read)."""
    batch = step["write_indices"].shape[0]
    return {
        **step,
        "vision_pos": np.zeros((batch, 0), dtype=np.int64),
        "instruct_pos": np.zeros((batch, 1), dtype=np.int64),
        "global_ctx": np.zeros((batch, 0, hidden_size), dtype=dtype),
    }
