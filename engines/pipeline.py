"""The Python API: open any folder the CLI opens (a checkpoint, an artifact, an engine folder), load it once, answer
many requests about images.

    from engines.pipeline import Pipeline

    fusion = Pipeline.open("art")                      # or a checkpoint folder, or an engine folder
    answer = fusion.generate("photo.jpg", "What is in front of the house?", max_new_tokens=64)
    print(answer.text, answer.finish_reason, answer.timings)
    for piece in fusion.stream("photo.jpg", "Describe it."):
        print(piece, end="", flush=True)

Everything goes through the backend seam (engines/backends.py) and the generation loop every command uses
(`reference_model.generation.generate`): the same prompt, batching, sampling and stop rules as `fusion-export
generate`, so a request and seed give the same tokens here, there and from the server (`fusion-export serve`).
Requests are checked (question, image size, positions, the folder's limits) before any compute.
"""

from __future__ import annotations

import io
import queue
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from reference_model.errors import FusionError
from reference_model.image_preprocessing import DEFAULT_MAX_IMAGE_PIXELS

from .backends import BackendKind, BackendOptions, backend_query_len, kind_of_folder, open_backend

ImageInput = str | Path | bytes | Image.Image | np.ndarray  # a file, its bytes, a PIL image, an H x W (x 3) array


@dataclass(frozen=True)
class Sampling:
    """How tokens are chosen; the CLI's flags of the same names."""

    max_new_tokens: int = 256
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0
    seed: int = 0


@dataclass
class Answer:
    text: str
    token_ids: list[int]
    finish_reason: str  # "stop" (the model ended its turn) or "length" (max_new_tokens)
    prompt_positions: int  # the prompt's length in positions (image tokens and latents included)
    timings: dict[str, float] = field(default_factory=dict)  # prefill_s, decode_s, decode_tokens_per_s, stages


def as_image(image: ImageInput, max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS) -> Image.Image | str | Path:
    """What make_request reads: paths as they are (opened and size-checked there), bytes decoded by Pillow, arrays
    as 8-bit images (H x W grey or H x W x 3 RGB)."""
    from reference_model.image_preprocessing import ImageError, open_image

    if isinstance(image, (str, Path, Image.Image)):
        return image
    if isinstance(image, (bytes, bytearray, memoryview)):
        return open_image(_Named(bytes(image)), max_pixels)
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8 or image.ndim not in (2, 3) or (image.ndim == 3 and image.shape[2] != 3):
            raise ImageError(f"image array of shape {image.shape} and dtype {image.dtype}: expected uint8, H x W or "
                             "H x W x 3 (RGB)")  # fmt: skip
        return Image.fromarray(image)
    raise ImageError(f"image of type {type(image).__name__}: give a path, bytes, a PIL image or a uint8 array")


class _Named(io.BytesIO):
    """Image bytes that say what they are in an error message."""

    def __str__(self) -> str:
        return f"image bytes ({len(self.getbuffer())} bytes)"


class Pipeline:
    """One loaded folder behind the backend seam; answers requests one batch at a time (not thread-safe: the server
    serializes its calls through one worker)."""

    def __init__(self, backend: Any, query_len: int | None = None, max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS):
        from reference_model.prompt import load_tokenizer, stop_token_ids

        self.backend = backend
        self.config = backend.config
        self.query_len = backend_query_len(backend, query_len)
        self.tokenizer = load_tokenizer(backend.model_dir)
        self.stop_token_ids = stop_token_ids(self.tokenizer, self.config.eos_token_ids)
        self.max_image_pixels = max_image_pixels

    @classmethod
    def open(
        cls,
        folder: str | Path,
        backend: BackendKind | str | None = None,
        options: BackendOptions | None = None,
        query_len: int | None = None,
        max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
        load: bool = True,
    ) -> Pipeline:
        """A checkpoint (PyTorch reference), an artifact (ONNX Runtime) or an engine folder (TensorRT); the backend
        from the folder unless named. `load`: read the weights or engines now (else on the first request)."""
        kind = backend or kind_of_folder(folder)
        if kind is None:
            raise FusionError(f"{folder}: not a checkpoint (config.json), an artifact (manifest.json) or an engine "
                              "folder (engines.json)")  # fmt: skip
        pipeline = cls(open_backend(kind, folder, options), query_len, max_image_pixels)
        if load:
            pipeline.backend.load()
        return pipeline

    @property
    def max_batch(self) -> int:
        """Rows one batch may hold: an engine folder's profile limit, else unbounded (say so with a large number)."""
        limits = getattr(self.backend, "limits", None)
        return int(limits["max_batch"]) if limits else 64

    def describe(self) -> str:
        return self.backend.describe()

    def prepare(self, image: ImageInput, question: str) -> Any:
        """One request checked and tokenized (question first, so an oversized one costs no image work)."""
        from reference_model import make_request

        return make_request(as_image(image, self.max_image_pixels), question, self.tokenizer, self.config,
                            self.max_image_pixels)  # fmt: skip

    def generate(self, image: ImageInput, question: str, **sampling: Any) -> Answer:
        """One answer; `sampling`: max_new_tokens, temperature, top_p, seed (Sampling)."""
        return self.generate_batch([(image, question)], Sampling(**sampling))[0]

    def generate_batch(self, requests: Sequence[tuple[ImageInput, str]], sampling: Sampling | None = None,
                       on_token=None) -> list[Answer]:  # fmt: skip
        """Several (image, question) pairs in one batch (left-padded, as every backend takes them); on_token(row,
        token_id) as each token is chosen."""
        from reference_model import generate

        sampling = sampling or Sampling()
        if not requests:
            return []
        if len(requests) > self.max_batch:
            raise FusionError(f"{len(requests)} requests in one batch; this folder takes at most {self.max_batch}")
        gen = self.generation_config(sampling)
        batch, session = self.open_session([self.prepare(image, q) for image, q in requests], gen.max_new_tokens)
        out = generate(session, gen, on_token=on_token)
        timings = {**out.timings, **getattr(session, "stage_seconds", {})}
        return [
            Answer(self.decode(ids), ids, reason, int(batch.layout.lengths[row]), timings)
            for row, (ids, reason) in enumerate(zip(out.token_ids, out.finish_reasons))
        ]

    def open_session(self, prepared: Sequence[Any], max_new_tokens: int) -> tuple[Any, Any]:
        """(the left-padded batch, the backend's session for it) of prepared requests; positions and the folder's
        limits checked before any compute."""
        from reference_model import prepare_batch
        from reference_model.generation import check_positions

        batch = prepare_batch(list(prepared), self.config, self.query_len)
        check_positions(batch.layout, max_new_tokens, self.config.decoder.rope.max_position_embeddings)
        return batch, self.backend.session(batch, max_new_tokens)

    def later_turn_ids(self, answer: list[int], question: str) -> list[int]:
        """The ids a conversation's later turn prefills (reference_model/conversation.py `follow_up_chunk`): the
        previous answer's ids not in the cache yet, ending in its end of turn, then the template and the question."""
        from reference_model.conversation import follow_up_chunk
        from reference_model.prompt import end_of_turn_id, follow_up_ids, instruct_ids
        from reference_model.sequence import check_question_length

        check_question_length(len(instruct_ids(question, self.tokenizer)), self.config, "a follow-up question")
        end = end_of_turn_id(self.tokenizer)
        return follow_up_chunk(answer, end, self.stop_token_ids, follow_up_ids(question, self.tokenizer))

    def answer_ids(self, text: str) -> list[int]:
        """An earlier answer given as text (a chat client's history), tokenized as plain text."""
        from reference_model.prompt import answer_ids

        return answer_ids(text, self.tokenizer)

    def generation_config(self, sampling: Sampling) -> Any:
        """The generation loop's settings for `sampling`, with this model's end-of-turn tokens."""
        from reference_model import GenerationConfig

        s = sampling
        return GenerationConfig(max_new_tokens=s.max_new_tokens, temperature=s.temperature, top_p=s.top_p,
                                seed=s.seed, stop_token_ids=self.stop_token_ids)  # fmt: skip

    def decode(self, token_ids: list[int]) -> str:
        """The text of generated tokens (special tokens, the end of turn among them, left out), as the CLI prints."""
        return self.tokenizer.decode(token_ids, skip_special_tokens=True)

    def conversation(self, image: ImageInput, history: Sequence[tuple[str, str | list[int]]] = ()) -> Conversation:
        """A conversation about one image: `ask` a question, then follow-up questions; each later turn prefills only
        its own tokens on top of what the turns before computed (docs/semantics.md section 8.1). `history`: earlier
        (question, answer) turns, as a chat client sends them (Conversation)."""
        return Conversation(self, image, history)

    def check_turns(self, history: Sequence[tuple[str, str]], question: str) -> None:
        """A conversation's texts checked before any compute: every question (as the first question, or as a
        later one), every answer."""
        from reference_model.prompt import encode_question
        from reference_model.sequence import check_question_length

        questions = [q for q, _ in history] + [question]
        check_question_length(len(encode_question(questions[0], self.tokenizer).instructs), self.config)
        for later in questions[1:]:
            self.later_turn_ids([], later)
        for _, answer in history:
            self.answer_ids(answer)

    def stream(self, image: ImageInput, question: str, **sampling: Any) -> Iterator[str]:
        """The answer as text pieces while it is generated (a generator; the request runs on a worker thread and
        is checked before the first piece)."""
        request = (image, question)
        settings = Sampling(**sampling)
        pieces: queue.Queue = queue.Queue()
        text = TextPieces(self.tokenizer)
        done = object()

        def work() -> None:
            try:
                self.generate_batch([request], settings, on_token=lambda row, token: pieces.put(text.add(token)))
                pieces.put(text.rest())
                pieces.put(done)
            except BaseException as e:  # handed to the caller's thread
                pieces.put(e)

        worker = threading.Thread(target=work, name="fusion-stream", daemon=True)
        worker.start()
        while (item := pieces.get()) is not done:
            if isinstance(item, BaseException):
                raise item
            if item:
                yield item
        worker.join()


class TextPieces:
    """Token ids -> the text they add, decoding the whole answer so far (a multi-byte character split over tokens
    appears once complete, never as a replacement character). The CLI streams through it too."""

    def __init__(self, tokenizer: Any):
        self.tokenizer, self.ids, self.sent = tokenizer, [], 0

    def add(self, token_id: int) -> str:
        self.ids.append(token_id)
        text = self.text
        if text.endswith("\ufffd"):  # an incomplete character: wait for the rest
            return ""
        piece, self.sent = text[self.sent :], len(text)
        return piece

    def rest(self) -> str:
        """At the end: what is still held back (an incomplete character stays as the decoder renders it)."""
        text = self.text
        piece, self.sent = text[self.sent :], len(text)
        return piece

    @property
    def text(self) -> str:
        return self.tokenizer.decode(self.ids, skip_special_tokens=True)


class Conversation:
    """Turns about one image. The first question is answered as `generate` answers it; each later one continues the
    kept state (the first turn's vision encoding, every turn's KV columns): its answer equals that of the whole
    conversation computed at once (reference_model/conversation.py), and its prefill costs its own tokens.

        chat = fusion.conversation("photo.jpg")
        print(chat.ask("What is in front of the house?").text)
        print(chat.ask("And what colour is it?").text)    # the image is not encoded again

    `history`: earlier turns as (question, answer) pairs, as a chat client sends them; they are prefilled with the
    first question asked. An answer is text (tokenized as plain text) or the token ids generated for it (ending in
    the end of turn, as every answer: follow_up_chunk): with those, the turn equals the conversation asked here
    turn by turn.
    """

    def __init__(self, pipeline: Pipeline, image: ImageInput, history: Sequence[tuple[str, str | list[int]]] = ()):
        self.pipeline, self.image = pipeline, image
        self.history = list(history)  # (question, answer) of every turn so far
        self.state: Any = None  # TurnState after the last turn asked here (None: nothing computed yet)

    def ask(self, question: str, sampling: Sampling | None = None, on_token: Callable[[int, int], None] | None = None,
            cancelled: Callable[[int], bool] | None = None, keep: bool = True, **settings: Any) -> Answer:  # fmt: skip
        """One turn; `sampling` or its fields as keywords (Sampling); on_token(row, id) and cancelled(row) as for
        `reference_model.generate` (row 0). `keep`: keep the state for a next turn (a server with no room for it
        says False; the next turn is then recomputed from the history)."""
        from reference_model import generate
        from reference_model.conversation import lay_out_chunks, turn_state
        from reference_model.generation import DecodeState

        if sampling is not None and settings:
            raise TypeError(f"give sampling or its fields ({', '.join(settings)}), not both")
        p = self.pipeline
        gen = p.generation_config(sampling or Sampling(**settings))
        if self.state is None and not self.history:
            batch, session = p.open_session([p.prepare(self.image, question)], gen.max_new_tokens)
            positions = int(batch.layout.lengths[0])
        else:
            kept = self.state
            if kept is None:  # the history's turn 1 alone, then each later turn's chunk with this one
                answers = [p.answer_ids(a) if isinstance(a, str) else list(a) for _, a in self.history]
                later = [q for q, _ in self.history[1:]] + [question]
                chunks = [p.later_turn_ids(a, q) for a, q in zip(answers, later)]
                batch, first = p.open_session([p.prepare(self.image, self.history[0][0])], 1)
                # the conversation's limits (positions, KV capacity) before any compute, as the follow-up checks them
                length = batch.layout.seq_len
                layouts = lay_out_chunks(length, length - 1, batch.query_len, chunks, p.config)
                columns = sum(c.text_ids.shape[1] for c in layouts)
                DecodeState.resumed(batch.layout.attention_mask[0], length - 1, columns, gen.max_new_tokens,
                                    p.config.decoder.rope.max_position_embeddings, p.backend.max_context)  # fmt: skip
                first.prefill()
                kept = turn_state(first, 0, [])
                del first  # its buffers, before the follow-up allocates its own
            else:
                chunks = [p.later_turn_ids(kept.pending, question)]
            session = p.backend.follow_up(kept, chunks, gen.max_new_tokens)
            positions = None
        out = generate(session, gen, on_token=on_token, cancelled=cancelled)
        ids, reason = out.token_ids[0], out.finish_reasons[0]
        timings = {**out.timings, **getattr(session, "stage_seconds", {})}
        answer = Answer(p.decode(ids), ids, reason, positions or session.state.prompt_positions, timings)
        # a cancelled turn leaves nothing to continue; the history still says what was asked and answered
        self.state = turn_state(session, 0, ids) if keep and reason != "cancelled" else None
        self.history.append((question, answer.text))
        return answer
