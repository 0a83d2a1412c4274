"""Requests, batching and sequence assembly (docs/semantics.md section 5).

A prompt holds two placeholders: the FIRST one receives the 729 image tokens and the SECOND the s^2 init
latents (upstream swaps them on purpose). Rows are LEFT padded so every row's last prompt token, the query of
its interaction layers, sits in the last column; RoPE positions restart at 0 on each row's first real token.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from .config import IMAGE_TOKEN_ID, LATENT_TOKEN_ID, FusionConfig
from .image_preprocessing import DEFAULT_MAX_IMAGE_PIXELS, static_hd_crops
from .model import VisionOutputs
from .prompt import RequestError, encode_question


@dataclass
class Request:
    input_ids: list[int]  # prompt ids with exactly one -300 and one -200 placeholder
    instructs: list[int]  # the question's ids for the vision tower (no padding)
    pixel_values: torch.Tensor  # (5, 3, H, W) static_hd crops


def make_request(
    image: Image.Image | str | Path,
    question: str,
    tokenizer: Any,
    config: FusionConfig,
    max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
) -> Request:
    """Tokenize (`encode_question`: the rule for every question from outside) and preprocess one question about
    one image; the question's length is checked before the image is decoded, so an oversized request costs no
    image work."""
    ids = encode_question(question, tokenizer)
    _check_question_length(len(ids.instructs), config)
    return Request(
        input_ids=ids.input_ids,
        instructs=ids.instructs,
        pixel_values=static_hd_crops(image, config.vision.image_size, max_image_pixels),
    )


def _check_question_length(n_tokens: int, config: FusionConfig, where: str = "the question") -> None:
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
    _check_question_length(len(request.instructs), config, "instructs")


@dataclass
class SequenceLayout:
    """Where everything sits in the padded prefill sequence (B rows x S columns)."""

    text_ids: torch.Tensor  # (B, S) int64 token ids; 0 at padding, image and latent columns
    attention_mask: torch.Tensor  # (B, S) bool, False at left padding
    position_ids: torch.Tensor  # (B, S) int64 RoPE positions, 0 at padding
    image_columns: torch.Tensor  # (B, n_img) int64 columns of the image tokens
    vision_pos: torch.Tensor  # (B, s^2) int64 columns of the latents
    instruct_pos: torch.Tensor  # (B, 1) int64 column of the last prompt token
    lengths: torch.Tensor  # (B,) int64 unpadded length of each row

    @property
    def batch_size(self) -> int:
        return self.text_ids.shape[0]

    @property
    def seq_len(self) -> int:
        return self.text_ids.shape[1]


def build_layout(prompts: list[list[int]], num_image_tokens: int, query_len: int) -> SequenceLayout:
    if not prompts:
        raise RequestError("a batch needs at least one request")
    rows = []
    for i, ids in enumerate(prompts):
        slots = [j for j, t in enumerate(ids) if t < 0]
        if sorted(ids[j] for j in slots) != sorted((IMAGE_TOKEN_ID, LATENT_TOKEN_ID)):
            raise RequestError(
                f"request {i}: input_ids must hold exactly one {LATENT_TOKEN_ID} (<latent_image>) and one "
                f"{IMAGE_TOKEN_ID} (<image>) placeholder, found negative ids {[ids[j] for j in slots]}"
            )
        first, second = slots
        pieces = (ids[:first], ids[first + 1 : second], ids[second + 1 :])
        rows.append(pieces)
    lengths = [len(a) + num_image_tokens + len(b) + query_len + len(c) for a, b, c in rows]
    B, S = len(rows), max(lengths)
    text_ids = torch.zeros(B, S, dtype=torch.int64)
    attention_mask = torch.zeros(B, S, dtype=torch.bool)
    position_ids = torch.zeros(B, S, dtype=torch.int64)
    image_columns = torch.zeros(B, num_image_tokens, dtype=torch.int64)
    vision_pos = torch.zeros(B, query_len, dtype=torch.int64)
    for b, ((a, mid, c), length) in enumerate(zip(rows, lengths)):
        start = S - length
        attention_mask[b, start:] = True
        position_ids[b, start:] = torch.arange(length)
        col = start
        text_ids[b, col : col + len(a)] = torch.tensor(a, dtype=torch.int64)
        col += len(a)
        image_columns[b] = torch.arange(col, col + num_image_tokens)
        col += num_image_tokens
        text_ids[b, col : col + len(mid)] = torch.tensor(mid, dtype=torch.int64)
        col += len(mid)
        vision_pos[b] = torch.arange(col, col + query_len)
        col += query_len
        text_ids[b, col:] = torch.tensor(c, dtype=torch.int64)
    return SequenceLayout(
        text_ids=text_ids,
        attention_mask=attention_mask,
        position_ids=position_ids,
        image_columns=image_columns,
        vision_pos=vision_pos,
        instruct_pos=torch.full((B, 1), S - 1, dtype=torch.int64),
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
    layout = build_layout([r.input_ids for r in requests], config.vision.num_patches, query_len)
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
    """Insert image tokens and init latents into the embedded text (B, S, D)."""
    D = text_embeds.shape[-1]
    image_index = layout.image_columns.to(text_embeds.device)[:, :, None].expand(-1, -1, D)
    latent_index = layout.vision_pos.to(text_embeds.device)[:, :, None].expand(-1, -1, D)
    embeds = text_embeds.scatter(1, image_index, vision.image_tokens.to(text_embeds.dtype))
    return embeds.scatter(1, latent_index, vision.init_latents.to(text_embeds.dtype))
