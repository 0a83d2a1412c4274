"""OpenAI's chat-completions request, read into one FUSION request: the image, the question, the sampling.

The wire format is OpenAI's (platform.openai.com/docs/api-reference/chat): `messages` with `text` and `image_url`
content parts, `max_tokens` / `max_completion_tokens`, `temperature`, `top_p`, `seed`, `stop`, `stream`,
`stream_options.include_usage`. A request is refused with a 4xx naming the field or limit at fault before any
compute; what a client writes is only ever the question's plain text (the CLI's rule: a special token spelled in
it is text, reference_model/prompt.py), and the roles it sends select where that text goes in the model's own
template, never what the template says.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from engines.pipeline import Sampling


class ApiError(Exception):
    """An HTTP error in OpenAI's shape: {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None):  # fmt: skip
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.headers = status, message, param, code, headers or {}

    def body(self) -> dict[str, Any]:
        kind = "invalid_request_error" if self.status < 500 else "server_error"
        return {"error": {"message": self.message, "type": kind, "param": self.param, "code": self.code}}


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")  # an unknown field is refused by name, never ignored


class ImageUrl(_Strict):
    url: str
    detail: Literal["auto", "low", "high"] | None = None


class Part(_Strict):
    type: Literal["text", "image_url"]
    text: str | None = None
    image_url: ImageUrl | None = None


class Message(_Strict):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[Part]
    name: str | None = None


class StreamOptions(_Strict):
    include_usage: bool = False


class ChatRequest(_Strict):
    model: str
    messages: list[Message] = Field(min_length=1)
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=1.0, ge=0, le=2)
    top_p: float = Field(default=1.0, gt=0, le=1)
    seed: int | None = Field(default=None, ge=0, lt=2**63)
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = Field(default=1, ge=1, le=1)
    user: str | None = None


@dataclass
class Limits:
    """What the server accepts; each is named when a request passes it."""

    max_tokens: int = 1024  # a request's new tokens (also the default when it gives none)
    max_image_bytes: int = 20_000_000  # an image's encoded bytes
    max_stops: int = 4  # OpenAI's limit on `stop`
    image_folder: Path | None = None  # local image files are read only from under this folder (--allow-images-from)


@dataclass
class ChatJob:
    """One request, read: what the pipeline needs."""

    image: bytes | Path
    question: str
    sampling: Sampling
    stops: list[str]
    stream: bool
    include_usage: bool
    history: list[tuple[str, str]] = field(default_factory=list)  # earlier turns: (question, answer text)
    image_digest: str = ""  # sha256 of the image's bytes: with the history, what finds a kept conversation


def _text_of(message: Message, index: int, images: bool) -> tuple[str, list[Part]]:
    """A message's text (its text parts joined by newlines) and its image parts."""
    parts = [Part(type="text", text=message.content)] if isinstance(message.content, str) else message.content
    found = [p for p in parts if p.type == "image_url"]
    if found and not images:
        raise ApiError(400, f"messages[{index}].content: an image_url part; a conversation is about the one image of "
                            "its first user message", "messages")  # fmt: skip
    texts = [p.text for p in parts if p.type == "text"]
    if any(t is None for t in texts):
        raise ApiError(400, f"messages[{index}].content: a text part without text", "messages")
    return "\n".join(texts), found


def read_chat(request: ChatRequest, limits: Limits) -> ChatJob:
    """The conversation's image, its earlier turns and the question to answer; everything else refused by name.
    Messages alternate user and assistant, from a user message with the image to the user message to answer."""
    if any(m.role in ("system", "developer") for m in request.messages):
        raise ApiError(400, "messages: system and developer messages are not taken; the model's template has its "
                            "own system turn", "messages")  # fmt: skip
    roles = [m.role for m in request.messages]
    if len(roles) % 2 == 0 or any(role != ("user" if i % 2 == 0 else "assistant") for i, role in enumerate(roles)):
        raise ApiError(400, f"messages: roles {roles}; a conversation alternates user and assistant messages, from "
                            "the first question to the one to answer (a user message)", "messages")  # fmt: skip
    question, images = _text_of(request.messages[0], 0, images=True)
    if len(images) != 1 or images[0].image_url is None:
        raise ApiError(400, f"messages[0].content: {len(images)} image_url parts; FUSION answers about exactly one "
                            "image", "messages")  # fmt: skip
    texts = [question] + [_text_of(m, i, images=False)[0] for i, m in enumerate(request.messages[1:], 1)]
    for i in range(0, len(texts), 2):
        if not texts[i].strip():
            why = " (the vision tower reads the first question)" if i == 0 else ""
            raise ApiError(400, f"messages[{i}].content: no question text{why}", "messages")
    history = list(zip(texts[0:-1:2], texts[1:-1:2]))
    new_tokens = request.max_completion_tokens or request.max_tokens or limits.max_tokens
    if new_tokens > limits.max_tokens:
        field = "max_completion_tokens" if request.max_completion_tokens else "max_tokens"
        raise ApiError(400, f"{field} {new_tokens}: this server generates at most {limits.max_tokens} tokens per "
                            "request", field)  # fmt: skip
    stops = [request.stop] if isinstance(request.stop, str) else list(request.stop or [])
    if len(stops) > limits.max_stops or any(not s for s in stops):
        raise ApiError(400, f"stop: at most {limits.max_stops} non-empty strings", "stop")
    sampling = Sampling(max_new_tokens=new_tokens, temperature=request.temperature, top_p=request.top_p,
                        seed=request.seed or 0)  # fmt: skip
    include_usage = bool(request.stream_options and request.stream_options.include_usage)
    if request.stream_options is not None and not request.stream:
        raise ApiError(400, "stream_options: only with stream true", "stream_options")
    image = read_image(images[0].image_url.url, limits)
    return ChatJob(image, texts[-1], sampling, stops, request.stream, include_usage, history)


def image_digest(image: bytes | Path, limits: Limits) -> str:
    """SHA-256 of the image's bytes (a file's read within --max-image-bytes): what, with the turns' text, finds a
    kept conversation. Called off the event loop."""
    where = "messages[0].content.image_url.url"
    if isinstance(image, bytes):
        return hashlib.sha256(image).hexdigest()
    try:
        with open(image, "rb") as f:
            data = f.read(limits.max_image_bytes + 1)
    except OSError as e:
        raise ApiError(400, f"{where}: {image.name}: {e.strerror}", where) from None
    if len(data) > limits.max_image_bytes:
        raise ApiError(413, f"{where}: the image is over {limits.max_image_bytes} bytes", where, "image_too_large")
    return hashlib.sha256(data).hexdigest()


def read_image(url: str, limits: Limits) -> bytes | Path:
    """A `data:` URL's bytes, or a local file under the allowed folder; the server makes no outbound connection."""
    where = "messages[0].content.image_url.url"
    if url.startswith("data:"):
        header, sep, payload = url.partition(",")
        if not sep or not header.endswith(";base64"):
            raise ApiError(400, f"{where}: a data: URL must be base64 (data:image/png;base64,...)", where)
        if len(payload) * 3 // 4 > limits.max_image_bytes:
            raise ApiError(413, f"{where}: the image is over {limits.max_image_bytes} bytes", where, "image_too_large")
        try:
            return base64.b64decode(payload, validate=True)
        except (binascii.Error, ValueError):
            raise ApiError(400, f"{where}: not valid base64", where) from None
    if url.startswith(("http://", "https://")):
        raise ApiError(400, f"{where}: http(s) image URLs are refused: this server makes no outbound connection; "
                            "send the image as a data: URL", where)  # fmt: skip
    path = Path(url.removeprefix("file://"))
    if limits.image_folder is None:
        raise ApiError(400, f"{where}: local image files are not allowed here (the server's --allow-images-from)",
                       where)  # fmt: skip
    root = limits.image_folder.resolve()
    resolved = Path(os.path.realpath(path if path.is_absolute() else root / path))
    if not resolved.is_relative_to(root):
        raise ApiError(403, f"{where}: {path} is outside the folder images may be read from", where)
    if not resolved.is_file():
        raise ApiError(400, f"{where}: {path} is not an image file under the allowed folder", where)
    return resolved
