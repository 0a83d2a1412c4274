"""Prompt building and tokenization as upstream FUSION does it (docs/semantics.md section 3).

The phi_3 template with `mm_use_im_start_end` puts a latent-image placeholder and an image placeholder before
the question. The prompt is cut at `<image>`, each piece at `<latent_image>`, every piece is tokenized on its
own, and when the first piece starts with BOS the first token of every later piece is dropped (its BOS); the
placeholders become ids -300 and -200. `instructs` is the question alone, tokenized normally.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from .config import IMAGE_TOKEN_ID, LATENT_TOKEN_ID
from .errors import FusionError

IMAGE_TOKEN = "<image>"
LATENT_TOKEN = "<latent_image>"
VISION_START = "<vision_start>"
VISION_END = "<vision_end>"
END_OF_TURN = "<|end|>"
SYSTEM_MESSAGE = "You are a helpful AI assistant."


class TokenizerError(FusionError):
    """The checkpoint's tokenizer is missing or lacks FUSION's special tokens."""


class RequestError(FusionError):
    """A request cannot be turned into a FUSION input sequence."""


def build_prompt(question: str) -> str:
    """The phi_3 conversation for one question about one image."""
    images = f"{VISION_START}{LATENT_TOKEN}{VISION_END}{VISION_START}{IMAGE_TOKEN}{VISION_END}"
    return f"<|system|>\n{SYSTEM_MESSAGE}{END_OF_TURN}\n<|user|>\n{images}\n{question}{END_OF_TURN}\n<|assistant|>\n"


def check_question(question: str) -> str:
    """A question FUSION can be asked: non-empty, valid text, without the prompt's own placeholders.

    Empty questions are refused on purpose: the vision tower reads the question to decide what to look at, and
    upstream was never run without one. The placeholders would add image slots to the prompt."""
    try:
        question.encode("utf-8")
    except UnicodeEncodeError as e:
        raise RequestError(f"the question is not valid text (undecodable character at position {e.start})") from None
    if not question.strip():
        raise RequestError("the question is empty; FUSION's vision tower reads the question, so ask one")
    for marker in (IMAGE_TOKEN, LATENT_TOKEN, VISION_START, VISION_END):
        if marker in question:
            raise RequestError(f"the question contains {marker!r}, a marker the prompt template reserves; remove it")
    return question


def _join_pieces(
    text: str, separator: str, placeholder: int, tokenize: Callable[[str], list[int]], bos: int | None
) -> list[int]:
    """Tokenize the pieces of `text` between separators on their own and join them with `placeholder`."""
    pieces = [tokenize(piece) for piece in text.split(separator)]
    offset = 1 if pieces[0] and pieces[0][0] == bos else 0  # upstream drops every later piece's first token
    ids = pieces[0][:offset]
    for i, piece in enumerate(pieces):
        if i > 0:
            ids.append(placeholder)
        ids.extend(piece[offset:])
    return ids


def tokenize_prompt(prompt: str, tokenizer: Any) -> list[int]:
    """Token ids with -200 for `<image>` and -300 for `<latent_image>` (upstream tokenizer_image_token)."""
    bos = tokenizer.bos_token_id

    def plain(piece: str) -> list[int]:
        return list(tokenizer(piece).input_ids)

    def with_latents(piece: str) -> list[int]:
        return _join_pieces(piece, LATENT_TOKEN, LATENT_TOKEN_ID, plain, bos)

    return _join_pieces(prompt, IMAGE_TOKEN, IMAGE_TOKEN_ID, with_latents, bos)


def instruct_ids(question: str, tokenizer: Any) -> list[int]:
    """The question the vision tower reads: image markers removed, stripped, tokenized (BOS kept)."""
    for marker in (IMAGE_TOKEN, VISION_START, VISION_END):
        question = question.replace(marker, "")
    return list(tokenizer(question.strip()).input_ids)


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                   "tokenizer.model", "vocab.json", "merges.txt")  # fmt: skip


def tokenizer_folder(model_dir: str | Path) -> Path:
    """The folder holding a checkpoint's tokenizer: the checkpoint itself, or its `tokenizer/`."""
    model_dir = Path(model_dir)
    for folder in (model_dir, model_dir / "tokenizer"):
        if (folder / "tokenizer_config.json").exists() or (folder / "tokenizer.json").exists():
            return folder
    raise TokenizerError(
        f"{model_dir}: no tokenizer (tokenizer.json / tokenizer_config.json) in the folder or tokenizer/"
    )


def load_tokenizer(model_dir: str | Path) -> Any:
    """The checkpoint's tokenizer (folder root or `tokenizer/`), with FUSION's vision markers checked."""
    from transformers import AutoTokenizer

    folder = tokenizer_folder(model_dir)
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    except Exception as e:  # transformers raises many types for a broken tokenizer folder
        raise TokenizerError(f"{folder}: tokenizer could not be loaded ({type(e).__name__}: {e})") from None
    vocab = tokenizer.get_vocab()
    missing = [t for t in (VISION_START, VISION_END) if t not in vocab]
    if missing:
        raise TokenizerError(f"{folder}: tokenizer lacks FUSION's special tokens {', '.join(missing)}")
    return tokenizer


def stop_token_ids(tokenizer: Any, eos_token_id: int | None) -> tuple[int, ...]:
    """Generation stops at `<|end|>` (end of the assistant turn) or the model's EOS id."""
    ids = []
    end = tokenizer.get_vocab().get(END_OF_TURN)
    for token_id in (end, eos_token_id, tokenizer.eos_token_id):
        if token_id is not None and token_id not in ids:
            ids.append(int(token_id))
    return tuple(ids)
