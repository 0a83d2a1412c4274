"""Prompt building and tokenization as upstream FUSION does it (docs/semantics.md section 3).

The family's template (`chat_template.py`: phi_3 or llama_3) with `mm_use_im_start_end` puts a latent-image
placeholder and an image placeholder before the question. The prompt is cut at `<image>`, each piece at
`<latent_image>`, every piece is tokenized on its own, and when the first piece starts with BOS the first token of
every later piece is dropped (its BOS); the placeholders become ids -300 and -200. `instructs` is the question
alone, tokenized normally.

The question is plain text (`encode_question`, the rule for every question from outside): text in it that spells
an added token of the tokenizer (`<|end|>`, `<s>`, ...) is tokenized as ordinary text, never as that token, so a
question can neither end its turn nor forge another; a question without such text tokenizes exactly as upstream.
"""

from __future__ import annotations

import json
import weakref
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .chat_template import PHI_3, TEMPLATES, VISION_END, VISION_START, ChatTemplate, template_for
from .config import IMAGE_TOKEN_ID, LATENT_TOKEN_ID, load_config
from .errors import FusionError
from .input_files import read_json, relative_name, require_regular_file

IMAGE_TOKEN = "<image>"
LATENT_TOKEN = "<latent_image>"
# The plain-text encoder's stand-ins for the template's tokens are built from a Unicode noncharacter (reserved
# for a program's internal use); a question holding it next to added-token text is refused.
STAND_IN_MARK = "\ufdd0"
# Ordinary text the plain-text encoder must tokenize exactly as the tokenizer itself, or it is not used.
_PROBES = ("What is shown in this picture? Answer briefly.", "  two  spaces  ", "\n<|x|>\t|é日🙂>")


class TokenizerError(FusionError):
    """The checkpoint's tokenizer is missing or lacks FUSION's special tokens."""


class RequestError(FusionError):
    """A request cannot be turned into a FUSION input sequence."""


# The template each tokenizer was loaded for (`load_tokenizer`); others are told by their vocabulary.
_TEMPLATES: weakref.WeakKeyDictionary[Any, ChatTemplate] = weakref.WeakKeyDictionary()


def template_of(tokenizer: Any) -> ChatTemplate:
    """The chat template `tokenizer` serves: its checkpoint's (`load_tokenizer`), else the one template whose
    tokens are all in its vocabulary."""
    known = _TEMPLATES.get(tokenizer)
    if known is not None:
        return known
    vocab = tokenizer.get_vocab()
    fits = [t for t in TEMPLATES.values() if all(token in vocab for token in t.tokens)]
    if len(fits) != 1:
        raise TokenizerError(
            "cannot tell this tokenizer's chat template: it holds the special tokens of "
            f"{' and '.join(t.name for t in fits) or 'neither phi_3 nor llama_3'}; load it with load_tokenizer"
        )
    return fits[0]


def _template(
    template: ChatTemplate, mark: Callable[[str], str] = lambda token: token, follow_up: bool = False
) -> tuple[str, str]:
    """The prompt before and after the question; `mark` rewrites the template's own tokens. A follow-up question
    (a later turn of a conversation, docs/semantics.md section 8.1) starts at the previous answer's end of turn:
    upstream's templates give it a latent placeholder of its own and no newline before the question."""
    t = template

    def marked(text: str) -> str:
        for token in t.tokens:
            text = text.replace(token, mark(token))
        return text

    after = marked(t.end_of_turn + t.separator + t.assistant)
    if follow_up:
        return marked(t.end_of_turn + t.separator + t.user + VISION_START) + LATENT_TOKEN + marked(VISION_END), after
    images = f"{VISION_START}{LATENT_TOKEN}{VISION_END}{VISION_START}{IMAGE_TOKEN}{VISION_END}"
    return marked(t.system + t.end_of_turn + t.separator + t.user + images + "\n"), after


def _last_piece(before: str) -> str:
    """The template's text between its last placeholder and the question: the start of the piece that holds it."""
    return before.rsplit(IMAGE_TOKEN, 1)[-1].rsplit(LATENT_TOKEN, 1)[-1]


def build_prompt(question: str, template: ChatTemplate = PHI_3) -> str:
    """The conversation for one question about one image, in `template` (the family's: `template_for`)."""
    before, after = _template(template)
    return before + question + after


def _question_of(prompt: str, template: ChatTemplate) -> str | None:
    """The question of a prompt `build_prompt` made; None for any other text."""
    before, after = _template(template)
    if len(prompt) < len(before) + len(after) or not (prompt.startswith(before) and prompt.endswith(after)):
        return None
    question = prompt[len(before) : len(prompt) - len(after)]
    return None if any(m in question for m in (IMAGE_TOKEN, LATENT_TOKEN)) else question  # a conversation's text


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


@dataclass(frozen=True)
class QuestionIds:
    input_ids: list[int]  # the prompt, with one -300 and one -200 placeholder
    instructs: list[int]  # the question the vision tower reads


def encode_question(question: str, tokenizer: Any) -> QuestionIds:
    """The rule for every question from outside (command line, calibration file, a server's message): checked
    (`check_question`), then tokenized as plain text into the prompt and the vision tower's instruction. Text
    spelling an added token of the tokenizer becomes ordinary text, never that token; where this tokenizer
    cannot encode it so, the question is refused naming the token."""
    check_question(question)
    return QuestionIds(prompt_ids(question, tokenizer), instruct_ids(question, tokenizer))


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


def _upstream_ids(prompt: str, tokenize: Callable[[str], list[int]], bos: int | None) -> list[int]:
    def with_latents(piece: str) -> list[int]:
        return _join_pieces(piece, LATENT_TOKEN, LATENT_TOKEN_ID, tokenize, bos)

    return _join_pieces(prompt, IMAGE_TOKEN, IMAGE_TOKEN_ID, with_latents, bos)


def tokenize_prompt(prompt: str, tokenizer: Any) -> list[int]:
    """Token ids with -200 for `<image>` and -300 for `<latent_image>` (upstream tokenizer_image_token). A prompt
    `build_prompt` made goes through `prompt_ids`, so its question is plain text whoever calls this."""
    question = _question_of(prompt, template_of(tokenizer))
    if question is not None:
        return prompt_ids(question, tokenizer)
    return _upstream_ids(prompt, lambda piece: list(tokenizer(piece).input_ids), tokenizer.bos_token_id)


def prompt_ids(question: str, tokenizer: Any, follow_up: bool = False) -> list[int]:
    """The prompt's ids: upstream's exactly when nothing in the question tokenizes to an added token, else with
    the question's text encoded as plain text in its real context (`_PlainText`). `follow_up`: the ids of a later
    turn (`follow_up_ids`), BOS and the leading end of turn included."""
    check_question(question)
    before, after = _template(template_of(tokenizer), follow_up=follow_up)
    last = _last_piece(before) + question + after  # the piece that holds the question
    span = (len(last) - len(after) - len(question), len(last) - len(after))

    def tokenize(piece: str) -> list[int]:
        batch = tokenizer(piece)
        typed = _typed_tokens(tokenizer, batch, piece, span) if piece == last else []
        if not typed:
            return list(batch.input_ids)
        return _plain_text(tokenizer, typed).prompt_piece(question, typed, follow_up)

    return _upstream_ids(before + question + after, tokenize, tokenizer.bos_token_id)


def follow_up_ids(question: str, tokenizer: Any) -> list[int]:
    """A later turn's ids, to follow the previous answer's end of turn (`<|end|>` / `<|eot_id|>`, the answer's own
    last token when it stopped): phi_3's `\n<|user|>\n<vision_start>`, the turn's latent placeholder (-300), then
    `<vision_end>{question}<|end|>\n<|assistant|>\n` (llama_3's headers likewise), each piece tokenized on its
    own as upstream cuts the whole conversation's text (an added token ends the text before it, so the pieces
    tokenize as they do in context). The question is plain text, as in `prompt_ids`."""
    ids = prompt_ids(question, tokenizer, follow_up=True)
    end_of_turn = template_of(tokenizer).end_of_turn
    end = tokenizer.convert_tokens_to_ids(end_of_turn)
    start = 1 if ids and ids[0] == tokenizer.bos_token_id and ids[0] != end else 0
    if ids[start] != end:
        raise TokenizerError(f"the tokenizer does not encode {end_of_turn} as one token; conversations need it")
    return ids[start + 1 :]


def end_of_turn_id(tokenizer: Any) -> int:
    """The id of the template's end-of-turn token, which closes every answer of a conversation."""
    return int(tokenizer.convert_tokens_to_ids(template_of(tokenizer).end_of_turn))


def instruct_ids(question: str, tokenizer: Any) -> list[int]:
    """The question the vision tower reads: image markers removed, stripped, tokenized (BOS kept); its text is
    plain text as in `prompt_ids`."""
    for marker in (IMAGE_TOKEN, VISION_START, VISION_END):
        question = question.replace(marker, "")
    text = question.strip()
    batch = tokenizer(text)
    typed = _typed_tokens(tokenizer, batch, text, (0, len(text)))
    return _plain_text(tokenizer, typed).encode(text, typed) if typed else list(batch.input_ids)


def answer_ids(text: str, tokenizer: Any) -> list[int]:
    """An earlier answer given as text (a chat client's history), tokenized on its own without BOS, as plain
    text: a client cannot forge template tokens through an answer either."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise RequestError(f"the answer is not valid text (undecodable character at position {e.start})") from None
    batch = tokenizer(text, add_special_tokens=False)
    typed = _typed_tokens(tokenizer, batch, text, (0, len(text)))
    return _plain_text(tokenizer, typed).encode(text, typed, special=False) if typed else list(batch.input_ids)


def _added_tokens(tokenizer: Any) -> dict[int, str]:
    """Every added token (special or not) by id: the ids no question's text may produce."""
    return {int(i): token.content for i, token in tokenizer.added_tokens_decoder.items()}


def _controls_in(
    encoding: Any, text: str, span: tuple[int, int], controls: dict[int, str], unk: int | None
) -> list[str]:
    """The added tokens among `encoding`'s tokens of `text` whose own text overlaps `text[span]`. Tokens the
    post-processor adds (BOS) have no text; the unknown token standing for a character the vocabulary lacks
    is that character, not a typed token; an added token that strips whitespace counts from its own text on."""
    found = []
    for token_id, (start, end), sequence in zip(encoding.ids, encoding.offsets, encoding.sequence_ids):
        if sequence is None or token_id not in controls:
            continue
        content, covered = controls[token_id], text[start:end]
        at = covered.find(content)
        if at < 0 and token_id == unk:
            continue
        if at >= 0:
            start, end = start + at, start + at + len(content)
        if max(start, span[0]) < min(max(end, start + 1), span[1]):
            found.append(content)
    return found


def _typed_tokens(tokenizer: Any, batch: Any, text: str, span: tuple[int, int]) -> list[str]:
    """The added tokens the question `text[span]` turned into in `batch` (the tokenizer's output for `text`)."""
    controls = _added_tokens(tokenizer)
    if not controls.keys() & set(batch.input_ids):
        return []
    if not batch.encodings:  # a slow tokenizer gives no offsets: any spelling of an added token counts
        question = text[span[0] : span[1]]
        return [content for content in controls.values() if content in question]
    return _controls_in(batch.encodings[0], text, span, controls, tokenizer.unk_token_id)


def _refusal(typed: list[str], why: str) -> RequestError:
    return RequestError(f"the question contains {typed[0]!r}, a control token of this tokenizer, {why}; remove it")


class _PlainText:
    """A private copy of a fast tokenizer that matches none of the original's added tokens in text, only
    stand-ins for the template's own tokens, with the same matching rules (lstrip, rstrip, single_word,
    normalized) and ids mapped back: the question's text is tokenized in its real context (normalizer,
    pre-tokenizer and prefix-space rules see the same splits) as if those tokens had never been added.

    Defense in depth: every encoding is checked to hold no added-token id from text and every template token
    once; a tokenizer this copy does not reproduce on ordinary text (`_PROBES`) is not used (refusal by name)."""

    def __init__(self, tokenizer: Any) -> None:
        self.unavailable: str | None = None
        self.template = template_of(tokenizer)
        backend = getattr(tokenizer, "backend_tokenizer", None)
        if backend is None or not hasattr(backend, "encode_special_tokens"):
            self.unavailable = "which needs a fast tokenizer (tokenizers >= 0.20) to be encoded as plain text"
            return
        from tokenizers import Tokenizer

        spec = json.loads(backend.to_str())
        added = {token["content"]: token for token in spec["added_tokens"]}
        next_id = max(backend.get_vocab(with_added_tokens=True).values()) + 1
        self.marks: dict[str, str] = {}
        self.restore: dict[int, int] = {}
        stand_ins = []
        for k, token in enumerate(t for t in self.template.tokens if t in added):
            content = f"{STAND_IN_MARK}{k}{STAND_IN_MARK}"
            stand_ins.append({**added[token], "id": next_id + k, "content": content, "special": False})
            self.marks[token], self.restore[next_id + k] = content, added[token]["id"]
        for token in spec["added_tokens"]:
            token["special"] = True  # encode_special_tokens skips them all: only the stand-ins still match
        spec["added_tokens"] += stand_ins
        spec["truncation"] = spec["padding"] = None  # as the tokenizer is called: whole text, one sequence
        self.backend = Tokenizer.from_str(json.dumps(spec))
        self.backend.encode_special_tokens = True
        self.controls = _added_tokens(tokenizer)
        self.unk = tokenizer.unk_token_id
        self.unavailable = self._probe(tokenizer)

    def _probe(self, tokenizer: Any) -> str | None:
        before, after = _template(self.template)
        for text in _PROBES:
            last = before.rsplit(IMAGE_TOKEN, 1)[1] + text + after
            span = (len(last) - len(after) - len(text), len(last) - len(after))
            if _typed_tokens(tokenizer, tokenizer(last), last, span):
                continue  # not ordinary text for this tokenizer
            try:
                same = self.prompt_piece(text, [text]) == tokenizer(last).input_ids
                same = same and self.encode(text, [text]) == tokenizer(text).input_ids
            except RequestError:
                same = False
            if not same:
                return "which this tokenizer cannot encode as plain text exactly"
        return None

    def prompt_piece(self, question: str, typed: list[str], follow_up: bool = False) -> list[int]:
        """The ids of the prompt's last piece (`<vision_end>\\n{question}<|end|>\\n<|assistant|>\\n`; a follow-up's
        without the newline)."""
        before, after = _template(self.template, lambda token: self.marks.get(token, token), follow_up)
        head = _last_piece(before)
        return self.encode(head + question + after, typed, (len(head), len(head) + len(question)))

    def encode(self, text: str, typed: list[str], span: tuple[int, int] | None = None, special: bool = True
               ) -> list[int]:  # fmt: skip
        """`text` tokenized as the tokenizer would with no added tokens; the question is `text[span]` (all of it
        by default), stand-ins only outside it; `special`: with the tokens the post-processor adds (BOS)."""
        start, end = span or (0, len(text))
        if STAND_IN_MARK in text[start:end]:  # it could spell a stand-in, which becomes a template token
            raise _refusal(typed, f"and U+{ord(STAND_IN_MARK):04X}, a noncharacter its plain-text encoding reserves")
        encoding = self.backend.encode(text, add_special_tokens=special)
        leaked = _controls_in(encoding, text, (0, len(text)), self.controls, self.unk)
        if leaked:
            raise _refusal(typed, f"and its text tokenizes to the control token {leaked[0]!r} even as plain text")
        if 2 * sum(token_id in self.restore for token_id in encoding.ids) != text.count(STAND_IN_MARK):
            raise _refusal(typed, "and as plain text it keeps the template's own tokens from being read")
        return [self.restore.get(token_id, token_id) for token_id in encoding.ids]


_ENCODERS: weakref.WeakKeyDictionary[Any, tuple[int, _PlainText]] = weakref.WeakKeyDictionary()


def _plain_text(tokenizer: Any, typed: list[str]) -> _PlainText:
    """The tokenizer's plain-text encoder, built once per tokenizer (again if tokens were added since)."""
    size = len(tokenizer)
    cached = _ENCODERS.get(tokenizer)
    if cached is None or cached[0] != size:
        cached = _ENCODERS[tokenizer] = (size, _PlainText(tokenizer))
    encoder = cached[1]
    if encoder.unavailable:
        raise _refusal(typed, encoder.unavailable)
    return encoder


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


# Real vocabularies' tokenizer.json files are 2-35 MB (Gemma's 262k tokens: ~33 MB).
MAX_TOKENIZER_FILE_BYTES = 256 << 20


def _tokenizer_config(folder: Path) -> dict[str, Any]:
    """`tokenizer_config.json` (bounded, a regular file), or {} for a folder without one."""
    config_path = folder / "tokenizer_config.json"
    if not (config_path.exists() or config_path.is_symlink()):
        return {}
    return read_json(config_path, "tokenizer config", error=TokenizerError)


def _file_arguments(folder: Path, config: dict[str, Any]) -> dict[str, str]:
    """The `*_file` entries of `tokenizer_config.json`, as paths inside `folder`. transformers lets such an entry
    override the folder's own file and opens it as given: an absolute path reads anywhere, a relative one from
    the working directory. So each must be a relative name, and it is passed back joined to the folder."""
    arguments = {}
    for key, value in config.items():
        if key.endswith("_file") and isinstance(value, str):
            where = f"{folder / 'tokenizer_config.json'}: {key}"
            arguments[key] = str(folder / relative_name(value, where, TokenizerError))
    return arguments


def _loader(folder: Path, config: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
    """The class to load `folder` with and its extra arguments, so that transformers 4.48+ and 5.x tokenize alike.

    AutoTokenizer gets a blank config, so tokenizer_config.json alone picks the class: transformers 5 would parse
    config.json, and a FUSION model_type (unknown to it) with `rope_scaling` fails there. And transformers 5's
    `LlamaTokenizer` (the class Phi-3 checkpoints declare) rebuilds the pipeline (Metaspace "first", tokenizer.json's
    normalizer dropped) where 4.x's LlamaTokenizerFast used tokenizer.json as written with a BOS/EOS template from
    add_bos_token (default on) and add_eos_token. Such a folder is loaded the 4.x way on 5.x."""
    from transformers import AutoTokenizer, PretrainedConfig, PreTrainedTokenizerFast, __version__

    declared = str(config.get("tokenizer_class", "")).removesuffix("Fast")
    has_json = (folder / "tokenizer.json").exists() or "tokenizer_file" in config
    if int(__version__.split(".")[0]) >= 5 and declared == "LlamaTokenizer" and has_json:
        template = {"add_bos_token": config.get("add_bos_token", True) is not False,
                    "add_eos_token": config.get("add_eos_token", False) is True}  # fmt: skip
        return PreTrainedTokenizerFast, template
    return AutoTokenizer, {"config": PretrainedConfig()}


def _checkpoint_family(model_dir: Path) -> str | None:
    """The checkpoint's model_type (its config.json's, checked); None for a folder without one."""
    return load_config(model_dir).model_type if (model_dir / "config.json").exists() else None


def load_tokenizer(model_dir: str | Path) -> Any:
    """The checkpoint's tokenizer (folder root or `tokenizer/`), with the special tokens of FUSION's vision markers
    and of its family's chat template checked."""
    model_type = _checkpoint_family(Path(model_dir))
    template = None if model_type is None else template_for(model_type)
    folder = tokenizer_folder(model_dir)
    for name in TOKENIZER_FILES:  # transformers would block on a FIFO, read a device without end, or any size
        path = folder / name
        if path.exists() or path.is_symlink():
            size = require_regular_file(path, "tokenizer file", error=TokenizerError).stat().st_size
            if size > MAX_TOKENIZER_FILE_BYTES:
                raise TokenizerError(
                    f"tokenizer file {path}: {size} bytes, over the {MAX_TOKENIZER_FILE_BYTES} a tokenizer may have"
                )
    try:
        config = _tokenizer_config(folder)
        loader, extra = _loader(folder, config)
        tokenizer = loader.from_pretrained(
            str(folder), local_files_only=True, **extra, **_file_arguments(folder, config)
        )
    except Exception as e:  # transformers raises many types for a broken tokenizer folder
        raise TokenizerError(f"{folder}: tokenizer could not be loaded ({type(e).__name__}: {e})") from None
    vocab = tokenizer.get_vocab()
    missing = [t for t in (VISION_START, VISION_END) if t not in vocab]
    if missing:
        raise TokenizerError(f"{folder}: tokenizer lacks FUSION's special tokens {', '.join(missing)}")
    if template is not None:
        missing = [t for t in template.tokens if t not in vocab]
        if missing:
            raise TokenizerError(
                f"{folder}: tokenizer lacks the {template.name} template's special tokens {', '.join(missing)}, "
                f"which config.json's model_type {model_type!r} prompts with"
            )
        _TEMPLATES[tokenizer] = template
    return tokenizer


def stop_token_ids(tokenizer: Any, eos_token_ids: int | Iterable[int] | None) -> tuple[int, ...]:
    """Generation stops at the template's end of turn (`<|end|>`, `<|eot_id|>`) or any of the model's EOS ids."""
    ids = []
    end = end_of_turn_id(tokenizer)
    eos = (eos_token_ids,) if eos_token_ids is None or isinstance(eos_token_ids, int) else tuple(eos_token_ids)
    for token_id in (None if end == tokenizer.unk_token_id else end, *eos, tokenizer.eos_token_id):
        if token_id is not None and token_id not in ids:
            ids.append(int(token_id))
    return tuple(ids)
