"""Golden outputs: what the reference computes for a set of inputs, saved to validate deployments against.

Inputs use the oracle's format: `input_ids` (B, L) int64 with -300/-200 placeholders, `instructs` (B, T) int64
(0 = padding), `images` (B, 5, 3, H, W) float32, and optionally `attention_mask` (B, L) marking the real tokens
of padded `input_ids` rows (either padding side).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file

from fusion_export.output_files import OutputKind, write_atomically
from reference_model import FusionConfig, FusionModel, GenerationConfig, ReferenceSession, Request, generate
from reference_model.errors import FusionError
from reference_model.input_files import load_safetensors
from reference_model.sequence import PreparedBatch, RequestError, prepare_batch


class InputsError(FusionError):
    """An inputs file does not hold what golden capture needs."""


def _check(path: Path, tensors: dict[str, torch.Tensor], name: str, dtype: torch.dtype, ndim: int) -> torch.Tensor:
    if name not in tensors:
        raise InputsError(f"{path}: missing tensor '{name}' (found: {', '.join(sorted(tensors)) or 'none'})")
    t = tensors[name]
    if t.dtype != dtype or t.ndim != ndim:
        raise InputsError(f"{path}: tensor '{name}' is {t.dtype} {list(t.shape)}, expected {dtype} with {ndim} dims")
    return t


def read_requests(path: str | Path) -> list[Request]:
    """One Request per batch row of an oracle-format inputs file (structure checked; values by read_batch)."""
    path = Path(path)
    if not (path.exists() or path.is_symlink()):
        raise InputsError(f"{path}: inputs file not found")
    if path.is_dir():
        raise InputsError(f"{path}: is a folder, not an inputs file")
    tensors = load_safetensors(path, error=InputsError)  # a regular file; header errors named
    input_ids = _check(path, tensors, "input_ids", torch.int64, 2)
    instructs = _check(path, tensors, "instructs", torch.int64, 2)
    images = _check(path, tensors, "images", torch.float32, 5)
    mask = tensors.get("attention_mask")
    if mask is None:
        mask = torch.ones_like(input_ids, dtype=torch.bool)
    elif mask.is_floating_point() or not ((mask == 0) | (mask == 1)).all():
        raise InputsError(f"{path}: tensor 'attention_mask' must hold integers 0 and 1, got {mask.dtype}")
    mask = mask.to(torch.bool)
    B = input_ids.shape[0]
    if instructs.shape[0] != B or images.shape[0] != B or mask.shape != input_ids.shape:
        raise InputsError(
            f"{path}: batch sizes disagree: input_ids {list(input_ids.shape)}, instructs {list(instructs.shape)}, "
            f"images {list(images.shape)}, attention_mask {list(mask.shape)}"
        )
    if B == 0:
        raise InputsError(f"{path}: the batch is empty")
    return [
        Request(
            input_ids=input_ids[b][mask[b]].tolist(),
            instructs=[t for t in instructs[b].tolist() if t != 0],
            pixel_values=images[b],
        )
        for b in range(B)
    ]


def read_batch(path: str | Path, config: FusionConfig, query_len: int) -> PreparedBatch:
    """An inputs file as a batch the model can run, every value checked against the model (shapes, finite
    pixels, ids in the vocabulary, lengths), with the file named in any error."""
    try:
        return prepare_batch(read_requests(path), config, query_len)
    except RequestError as e:
        raise InputsError(f"{path}: {e}") from None


@dataclass
class GoldenSettings:
    query_len: int
    max_new_tokens: int
    hidden_states: bool = False


def capture_golden(model: FusionModel, batch: PreparedBatch, settings: GoldenSettings) -> dict[str, torch.Tensor]:
    """Prefill logits (all positions), greedy ids without EOS stop and the logits of each step, vision stage
    outputs, the sequence layout, and optionally the decoder hidden states named as in the oracle."""
    session = ReferenceSession(model, batch, settings.max_new_tokens)
    session.keep_prefill_logits = True
    if settings.hidden_states:
        session.hidden_states = []
    out = generate(session, GenerationConfig(max_new_tokens=settings.max_new_tokens), keep_logits=True)
    layout, vision = batch.layout, session.vision
    golden = {
        "logits": session.prefill_logits,
        "generated_ids": torch.tensor(out.token_ids, dtype=torch.int64),
        "generate_step_logits": out.step_logits,
        "image_tokens": vision.image_tokens.float(),
        "init_latents": vision.init_latents.float(),
        "global_ctx": vision.global_ctx.float(),
        "attention_mask": layout.attention_mask.to(torch.int64),
        "vision_pos": layout.vision_pos,
        "instruct_pos": layout.instruct_pos,
    }
    for k, h in enumerate(session.hidden_states or []):
        golden[f"hidden_states_{k}"] = h.float()
    return {name: t.detach().cpu().contiguous() for name, t in golden.items()}


def save_golden(golden: dict[str, torch.Tensor], path: str | Path, metadata: dict[str, object]) -> None:
    """Write atomically, marked as a golden file (so a later run may replace it, and nothing else)."""
    header = {"format": OutputKind.golden.marker, **{k: json.dumps(v) for k, v in metadata.items()}}
    write_atomically(path, lambda tmp: save_file(golden, tmp, metadata=header))
