"""Requests, batching and sequence assembly (docs/semantics.md section 5).

A prompt holds two placeholders: the FIRST one receives the n image tokens (729 or 576) and the SECOND the s^2 init
latents (upstream swaps them on purpose). Rows are LEFT padded so every row's last prompt token, the query of
its interaction layers, sits in the last column; RoPE positions restart at 0 on each row's first real token.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from .config import IMAGE_TOKEN_ID, LATENT_TOKEN_ID, FusionConfig
from .limits import DEFAULT_MAX_IMAGE_PIXELS
from .model import VisionOutputs
from .prompt import RequestError, encode_question

if TYPE_CHECKING:
    from PIL import Image


@dataclass
class Request:
    input_ids: list[int]  # prompt ids with exactly one -300 and one -200 placeholder
    instructs: list[int]  # the question's ids for the vision tower (no padding)
    pixel_values: torch.Tensor  # (5, 3, H, W) static_hd crops
    # a conversation of several turns (docs/semantics.md 8.1): the index in input_ids of each turn's last prompt
    # token, the query of that turn's latent block; () = one turn, the last id
    turn_ends: tuple[int, ...] = ()


def make_request(
    image: Image.Image | str | Path,
    question: str,
    tokenizer: Any,
    config: FusionConfig,
    max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
) -> Request:
    """Tokenize (`encode_question`: the rule for every question from outside) and preprocess one question about
    one image; the question's length is checked before the image is decoded, so an oversized request costs no
    image work. Pillow is imported here, for image files: a request made of tensors needs none."""
    from .image_preprocessing import static_hd_crops

    ids = encode_question(question, tokenizer)
    check_question_length(len(ids.instructs), config)
    return Request(
        input_ids=ids.input_ids,
        instructs=ids.instructs,
        pixel_values=static_hd_crops(image, config.vision.image_size, max_image_pixels),
    )


def check_question_length(n_tokens: int, config: FusionConfig, where: str = "the question") -> None:
    if n_tokens > config.max_question_tokens:
        raise RequestError(
            f"{where} is {n_tokens} tokens; this model reads questions of at most {config.max_question_tokens} "
            "tokens (tokenizer_model_max_length in config.json, where upstream cuts every sequence)"
        )


def check_request(request: Request, config: FusionConfig) -> None:
    """Everything the model indexes or computes with, checked before any compute: crop shape, finite pixels,
    token ids inside the vocabulary (placeholders aside), a question the vision tower can read."""
    v, vocab = config.vision, config.decoder.vocab_size
    expected = (5, v.num_channels, v.image_size, v.image_size)
    pixels = request.pixel_values
    if not isinstance(pixels, torch.Tensor) or tuple(pixels.shape) != expected or not pixels.is_floating_point():
        got = f"{pixels.dtype} {list(pixels.shape)}" if isinstance(pixels, torch.Tensor) else type(pixels).__name__
        raise RequestError(f"images: {got}, the model reads float crops of shape {list(expected)} (static_hd)")
    if not bool(torch.isfinite(pixels).all()):
        raise RequestError("images: holds NaN or Inf values")
    text = [t for t in request.input_ids if t not in (IMAGE_TOKEN_ID, LATENT_TOKEN_ID)]
    outside = [t for t in text if not 0 <= t < vocab]
    if outside:
        raise RequestError(
            f"input_ids: id {outside[0]} is outside the model's vocabulary 0..{vocab - 1} "
            f"({len(outside)} such id(s); a tokenizer that does not belong to this checkpoint?)"
        )
    outside = [t for t in request.instructs if not 0 < t < vocab]
    if outside:
        raise RequestError(f"instructs: id {outside[0]} is outside 1..{vocab - 1} (0 is padding)")
    check_question_length(len(request.instructs), config, "instructs")


@dataclass
class SequenceLayout:
    """Where everything sits in the padded prefill sequence (B rows x S columns)."""

    text_ids: torch.Tensor  # (B, S) int64 token ids; 0 at padding, image and latent columns
    attention_mask: torch.Tensor  # (B, S) bool, False at left padding
    position_ids: torch.Tensor  # (B, S) int64 RoPE positions, 0 at padding
    image_columns: torch.Tensor  # (B, n_img) int64 columns of the image tokens
    vision_pos: torch.Tensor  # (B, n s^2) int64 columns of the latents: n blocks, one per turn
    instruct_pos: torch.Tensor  # (B, n) int64 column of each turn's last prompt token (one turn: the last column)
    lengths: torch.Tensor  # (B,) int64 unpadded length of each row

    @property
    def batch_size(self) -> int:
        return self.text_ids.shape[0]

    @property
    def seq_len(self) -> int:
        return self.text_ids.shape[1]


def build_layout(
    prompts: list[list[int]], num_image_tokens: int, query_len: int, turn_ends: list[tuple[int, ...]] | None = None
) -> SequenceLayout:
    """Place each prompt in a left-padded row. The first placeholder receives the image tokens, every later one a
    block of query_len latents (one turn: the `<image>` placeholder; a conversation: one more `<latent_image>` per
    later turn). `turn_ends`: per prompt, the index of each turn's last prompt token (Request.turn_ends)."""
    if not prompts:
        raise RequestError("a batch needs at least one request")
    ends = [tuple(e) or (len(ids) - 1,) for ids, e in zip(prompts, turn_ends or [()] * len(prompts))]
    for i, (ids, turn) in enumerate(zip(prompts, ends)):
        found = [t for t in ids if t < 0]
        wanted = [LATENT_TOKEN_ID] * len(turn) + [IMAGE_TOKEN_ID]
        if sorted(found) != sorted(wanted):
            raise RequestError(
                f"request {i}: input_ids must hold exactly one {LATENT_TOKEN_ID} (<latent_image>) placeholder per "
                f"turn ({len(turn)} turn(s)) and one {IMAGE_TOKEN_ID} (<image>), found negative ids {found}"
            )
        blocks = [j for j, t in enumerate(ids) if t < 0][1:] + [len(ids)]  # each turn's block, then the end
        if not all(0 <= e < len(ids) and ids[e] >= 0 and blocks[k] < e < blocks[k + 1] for k, e in enumerate(turn)):
            raise RequestError(f"request {i}: turn ends {list(turn)}: each turn's end must be a text id after its "
                               "block and before the next turn's")  # fmt: skip
    if len({len(turn) for turn in ends}) > 1:
        raise RequestError("the requests of one batch must hold the same number of turns")
    blocks = len(ends[0])
    lengths = [len(ids) - (blocks + 1) + num_image_tokens + blocks * query_len for ids in prompts]
    B, S = len(prompts), max(lengths)
    text_ids = torch.zeros(B, S, dtype=torch.int64)
    attention_mask = torch.zeros(B, S, dtype=torch.bool)
    position_ids = torch.zeros(B, S, dtype=torch.int64)
    image_columns = torch.zeros(B, num_image_tokens, dtype=torch.int64)
    vision_pos = torch.zeros(B, blocks * query_len, dtype=torch.int64)
    instruct_pos = torch.zeros(B, blocks, dtype=torch.int64)
    for b, (ids, length) in enumerate(zip(prompts, lengths)):
        start = S - length
        attention_mask[b, start:] = True
        position_ids[b, start:] = torch.arange(length)
        col, block, columns = start, -1, []  # columns: each text id's column; block -1: no placeholder yet
        for t in ids:
            if t >= 0:
                text_ids[b, col] = t
                columns.append(col)
                col += 1
                continue
            columns.append(-1)
            if block < 0:  # the first placeholder: the image tokens
                image_columns[b] = torch.arange(col, col + num_image_tokens)
                block, col = 0, col + num_image_tokens
            else:
                vision_pos[b, block * query_len : (block + 1) * query_len] = torch.arange(col, col + query_len)
                block, col = block + 1, col + query_len
        instruct_pos[b] = torch.tensor([columns[e] for e in ends[b]], dtype=torch.int64)
    return SequenceLayout(
        text_ids=text_ids,
        attention_mask=attention_mask,
        position_ids=position_ids,
        image_columns=image_columns,
        vision_pos=vision_pos,
        instruct_pos=instruct_pos,
        lengths=torch.tensor(lengths, dtype=torch.int64),
    )


def pad_instructs(instructs: list[list[int]]) -> torch.Tensor:
    """(B, T) int64, right padded with 0 (upstream's padding id; the tower masks id 0)."""
    if any(len(x) == 0 for x in instructs):
        raise RequestError("every request needs a non-empty instruction (the question's token ids)")
    if any(0 in x for x in instructs):
        raise RequestError("instruction ids must not contain 0: upstream treats id 0 as padding")
    T = max(len(x) for x in instructs)
    out = torch.zeros(len(instructs), T, dtype=torch.int64)
    for b, x in enumerate(instructs):
        out[b, : len(x)] = torch.tensor(x, dtype=torch.int64)
    return out


@dataclass
class PreparedBatch:
    layout: SequenceLayout
    instructs: torch.Tensor  # (B, T) int64, 0 = padding
    pixel_values: torch.Tensor  # (B, 5, 3, H, W) float32
    query_len: int


def prepare_batch(requests: list[Request], config: FusionConfig, query_len: int) -> PreparedBatch:
    config.check_query_len(query_len)
    for i, request in enumerate(requests):
        try:
            check_request(request, config)
        except RequestError as e:
            raise RequestError(f"request {i}: {e}" if len(requests) > 1 else str(e)) from None
    turn_ends = [r.turn_ends for r in requests]
    layout = build_layout([r.input_ids for r in requests], config.vision.num_patches, query_len, turn_ends)
    positions = config.decoder.rope.max_position_embeddings
    if int(layout.lengths.max()) > positions:
        raise RequestError(
            f"the prompt is {int(layout.lengths.max())} positions after image expansion; the model has {positions}"
        )
    return PreparedBatch(
        layout=layout,
        instructs=pad_instructs([r.instructs for r in requests]),
        pixel_values=torch.stack([r.pixel_values for r in requests]),
        query_len=query_len,
    )


def assemble_embeddings(layout: SequenceLayout, text_embeds: torch.Tensor, vision: VisionOutputs) -> torch.Tensor:
    """Insert image tokens and init latents into the embedded text (B, S, D); every turn's block starts from the
    same init latents."""
    D = text_embeds.shape[-1]
    image_index = layout.image_columns.to(text_embeds.device)[:, :, None].expand(-1, -1, D)
    latent_index = layout.vision_pos.to(text_embeds.device)[:, :, None].expand(-1, -1, D)
    embeds = text_embeds.scatter(1, image_index, vision.image_tokens.to(text_embeds.dtype))
    latents = vision.init_latents.repeat(1, layout.instruct_pos.shape[1], 1)
    return embeds.scatter(1, latent_index, latents.to(text_embeds.dtype))
