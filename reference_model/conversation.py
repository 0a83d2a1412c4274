"""Conversations of several turns about one image (docs/semantics.md section 8.1).

A conversation is the one sequence upstream's template (phi_3, llama_3) makes of all its turns: turn 1's prompt (the
image tokens, latent block 1, question 1), answer 1, then for every later turn the end of turn and a user turn
(phi_3: `<|end|>\\n<|user|>\\n<vision_start>`), a latent block of its own, `<vision_end>` and the question. The
vision tower reads the FIRST question (fixed for the conversation); block k is refined by the interaction layers
with the hidden state of turn k's last prompt token, every block against the same context windows.
`whole_conversation` writes that sequence as one request: its prefill is the definition.

Because attention is causal and block k's update reads only positions before block k+1, everything a turn computed
is the exact prefix of the whole conversation's prefill: its KV cache is kept (`TurnState`) and the next turn
prefills only its own chunk (`follow_up_chunk`: the previous answer's unwritten tokens, the template, its block,
its question) on top of it, with the interaction layers refining that chunk's block alone.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from .config import LATENT_TOKEN_ID, FusionConfig
from .decoder import attention_mask
from .generation import DecodeState, GenerationError, ReferenceSession, StageClock, require_finite
from .model import FusionModel, VisionOutputs
from .prompt import RequestError
from .sequence import Request


@dataclass
class TurnState:
    """What a turn leaves for the next: one row's KV columns and where it stands. The arrays are the backend's
    own (torch on the reference's device, numpy for ONNX Runtime, device tensors for TensorRT)."""

    cache: list[Any]  # per layer key then value, (1, kv_heads, length, head_dim), as the backend stores them
    key_valid: torch.Tensor  # (length,) bool: False at the first turn's left padding
    position: int  # RoPE position of the last written column
    pending: list[int]  # generated ids not in the cache yet: the answer's last token, never fed back
    init_latents: Any  # (1, s^2, D): every block starts from them
    global_ctx: Any  # (1, (s w)^2, D): every block's windows

    @property
    def length(self) -> int:
        return int(self.key_valid.shape[0])

    @property
    def nbytes(self) -> int:
        """What keeping it costs: the KV columns and the vision outputs (the row's own copies)."""
        return sum(int(a.nbytes) for a in (*self.cache, self.init_latents, self.global_ctx))


def row_frame(state: DecodeState, row: int, generated: int) -> tuple[int, torch.Tensor, int]:
    """(columns, valid columns, last RoPE position) of one row after it generated `generated` tokens. The batch's
    columns are shared: a row that finished early was fed filler afterwards, which is not its own."""
    length = state.prefilled + max(generated - 1, 0)  # none generated: the prefill's columns
    position = int(state.positions[row]) - (state.length - length)
    return length, state.key_valid[row, :length].clone(), position


def follow_up_chunk(answer: list[int], end_of_turn: int, stop_ids: Collection[int], question_ids: list[int]
                    ) -> list[int]:  # fmt: skip
    """The ids a later turn prefills: the previous answer's ids not in the cache yet ending in the end of turn (an
    answer that stopped on another stop id, EOS, has it replaced: the template ends every answer with its end of
    turn, `<|end|>` or `<|eot_id|>`;
    one cut by max_new_tokens or given as text gets one), then `follow_up_ids` of the question."""
    ids = list(answer)
    if ids and ids[-1] in stop_ids:
        ids[-1] = end_of_turn
    else:
        ids.append(end_of_turn)
    return ids + list(question_ids)


@dataclass
class ChunkLayout:
    """A chunk prefilled on top of a kept cache (batch of one)."""

    text_ids: torch.Tensor  # (1, N) int64; 0 at the block's columns
    position_ids: torch.Tensor  # (1, N) int64 RoPE positions, continuing the turn before
    vision_pos: torch.Tensor  # (1, s^2) int64 columns of the block, counted from the chunk's first token
    instruct_pos: torch.Tensor  # (1, 1) int64 the chunk's last token: this turn's last prompt token
    start: int  # the cache column of its first token


def chunk_layout(chunk: list[int], query_len: int, start: int, position: int, config: FusionConfig) -> ChunkLayout:
    """Lay out a follow-up chunk after `start` cache columns whose last RoPE position is `position`. Refused: a
    chunk without exactly one block, and a conversation past LongRoPE's original context, where one prefill of the
    whole conversation would switch every position to the long factors while the kept keys hold short-factor
    rotations (docs/semantics.md section 7)."""
    slots = [j for j, t in enumerate(chunk) if t < 0]
    if [chunk[j] for j in slots] != [LATENT_TOKEN_ID]:
        raise RequestError(f"a follow-up turn holds one {LATENT_TOKEN_ID} (<latent_image>) placeholder, found "
                           f"{[chunk[j] for j in slots]}")  # fmt: skip
    vocab = config.decoder.vocab_size
    outside = [t for t in chunk if t >= vocab]
    if outside:
        raise RequestError(f"a follow-up turn's id {outside[0]} is outside the model's vocabulary 0..{vocab - 1}")
    at = slots[0]
    text = [*chunk[:at], *([0] * query_len), *chunk[at + 1 :]]
    n = len(text)
    rope = config.decoder.rope
    limit = rope.switch_position or rope.max_position_embeddings
    if position + n + 1 > limit:
        why = ("LongRoPE's original context, where upstream cuts every sequence" if rope.switch_position
               else "the model's positions")  # fmt: skip
        raise GenerationError(
            f"the conversation would reach {position + n + 1} positions; a conversation continues within "
            f"{limit} ({why}): start a new one"
        )
    return ChunkLayout(
        text_ids=torch.tensor([text], dtype=torch.int64),
        position_ids=position + 1 + torch.arange(n)[None],
        vision_pos=torch.arange(at, at + query_len)[None],
        instruct_pos=torch.tensor([[n - 1]]),
        start=start,
    )


def resumed_state(turn: TurnState, columns: int, max_new_tokens: int, max_positions: int,
                  capacity: int | None = None) -> DecodeState:  # fmt: skip
    """The DecodeState of a session that continues `turn` (one row) with chunks of `columns` cache columns in
    all: capacity for the kept columns, the chunks and the new tokens, or the graphs' fixed one."""
    return DecodeState.resumed(turn.key_valid, turn.position, columns, max_new_tokens, max_positions, capacity)


def whole_conversation(first: Request, answers: list[list[int]], follow_ups: list[list[int]], end_of_turn: int,
                       stop_ids: Collection[int]) -> Request:  # fmt: skip
    """The whole conversation as one request (the definition a follow-up must equal): turn 1's prompt, then per
    later turn the previous answer (its generated ids) ending in its end of turn and the turn's `follow_up_ids`;
    each turn's last prompt token queries its block."""
    if len(answers) != len(follow_ups):
        raise RequestError("a conversation needs one answer before every follow-up question")
    ids, ends = list(first.input_ids), [len(first.input_ids) - 1]
    for answer, question in zip(answers, follow_ups):
        ids += follow_up_chunk(answer, end_of_turn, stop_ids, question)
        ends.append(len(ids) - 1)
    return Request(input_ids=ids, instructs=first.instructs, pixel_values=first.pixel_values, turn_ends=tuple(ends))


def turn_state(session: Any, row: int, generated: list[int]) -> TurnState:
    """What `session` (any backend's, after generate) keeps of one row for its next turn. The session gives its
    `state` (DecodeState), `vision` (VisionOutputs) and `kept_cache(row, length)`; the row's vision outputs are
    copied, so a kept turn holds no other row's."""
    length, valid, position = row_frame(session.state, row, len(generated))
    vision = session.vision
    own = lambda x: x[row : row + 1].copy() if isinstance(x, np.ndarray) else x[row : row + 1].clone()  # noqa: E731
    return TurnState(
        cache=session.kept_cache(row, length),
        key_valid=valid,
        position=position,
        pending=generated[-1:],
        init_latents=own(vision.init_latents),
        global_ctx=own(vision.global_ctx),
    )


def lay_out_chunks(start: int, position: int, query_len: int, chunks: list[list[int]], config: FusionConfig
                   ) -> list[ChunkLayout]:  # fmt: skip
    """Each chunk's layout, one after the other, after `start` columns whose last RoPE position is `position`."""
    layouts = []
    for chunk in chunks:
        layout = chunk_layout(chunk, query_len, start, position, config)
        layouts.append(layout)
        start, position = start + layout.text_ids.shape[1], position + layout.text_ids.shape[1]
    return layouts


def chunk_layouts(turn: TurnState, chunks: list[list[int]], config: FusionConfig) -> list[ChunkLayout]:
    """Each chunk's layout, one after the other on top of `turn`."""
    return lay_out_chunks(turn.length, turn.position, int(turn.init_latents.shape[1]), chunks, config)


class ReferenceFollowUp(ReferenceSession):
    """The reference's session for a later turn (DecoderSession): the kept cache, then each chunk prefilled on top
    of it with the interaction layers refining the chunk's block, then decode steps as any session."""

    def __init__(self, model: FusionModel, turn: TurnState, chunks: list[list[int]], max_new_tokens: int,
                 kv_int8_scales: list[tuple[float, float]] | None = None):  # fmt: skip
        self.model, self.batch_size = model, 1
        self.layouts = chunk_layouts(turn, chunks, model.config)
        columns = sum(c.text_ids.shape[1] for c in self.layouts)
        max_positions = model.config.decoder.rope.max_position_embeddings
        self.state = resumed_state(turn, columns, max_new_tokens, max_positions)
        self.cache = model.new_cache(1, self.state.capacity, kv_int8_scales)
        for stored, kept in zip((t for kv in zip(self.cache.keys, self.cache.values) for t in kv), turn.cache):
            stored[:, :, : turn.length] = kept.to(stored.device, stored.dtype)
        self.cache.advance(turn.length)
        device = model.device
        self.vision = VisionOutputs(None, turn.init_latents.to(device), turn.global_ctx.to(device))
        self.keep_prefill_logits, self.prefill_logits, self.hidden_states = False, None, None

    @torch.inference_mode()
    def prefill(self) -> torch.Tensor:
        model, device, state, vision = self.model, self.model.device, self.state, self.vision
        clock = StageClock(self.synchronize)
        clock.lap("vision_encoder")  # nothing: the first turn's encoding is kept
        for chunk in self.layouts:
            n = chunk.text_ids.shape[1]
            embeds = model.embed_tokens(chunk.text_ids.to(device))
            index = chunk.vision_pos.to(device)[:, :, None].expand(-1, -1, embeds.shape[-1])
            embeds = embeds.scatter(1, index, vision.init_latents.to(embeds.dtype))
            cos, sin = self._rope(chunk.position_ids)
            state.extend(n)
            columns = torch.arange(chunk.start, chunk.start + n, device=device)
            mask = attention_mask(state.key_valid[:, : state.length].to(device), columns)
            interaction = model.interaction_inputs(vision.global_ctx, chunk.vision_pos.to(device),
                                                   chunk.instruct_pos.to(device))  # fmt: skip
            h = model.decode(embeds, cos, sin, mask, self.cache, interaction)
            self.cache.advance(n)
        logits = model.logits(h[:, -1])
        clock.lap("decoder_prefill")
        self.stage_seconds = clock.seconds
        require_finite("decoder prefill", logits=logits)
        return logits
