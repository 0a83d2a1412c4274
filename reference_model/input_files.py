"""Reading files the user hands us, bounded: every JSON file, and the regular-file check before any open.

Artifacts, engine folders and checkpoints travel between machines and users, so nothing read from them is
trusted to be small, shallow or even a file: a FIFO would block `open` forever, a 10 GB "config.json" would fill
memory, and 100,000 nested brackets end Python's JSON parser in a RecursionError. Every reader goes through
`require_regular_file` (before opening) and `read_bounded` (size bounded) or `read_json` (size and nesting
bounded), which raise a `FusionError` naming the file; safetensors files go through `open_safetensors` /
`load_safetensors` (regular file, and the library's own header errors reported with the file named).
"""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path, PurePosixPath
from typing import Any

from .errors import FusionError

# Our largest JSON is a full-size artifact's manifest (~40 kB) or tokenizer.json (~2-9 MB for real vocabularies,
# read by transformers, not here); 64 MiB leaves every legitimate file far inside the bound.
MAX_JSON_BYTES = 64 << 20
# Deepest legitimate nesting in anything we read is ~6 (a manifest's graphs.{name}.inputs[i].shape[j]).
MAX_JSON_DEPTH = 64


class InputFileError(FusionError):
    """A file that is not a regular file, too large, too deeply nested or not what it claims to be."""


def _label(path: Path, what: str) -> str:
    return f"{what} {path}" if what else str(path)


def _check_mode(mode: int, label: str, error: type[FusionError]) -> None:
    if stat.S_ISDIR(mode):
        raise error(f"{label}: is a folder, expected a file")
    if not stat.S_ISREG(mode):
        raise error(f"{label}: not a regular file (a device, FIFO or socket); refusing to open it")


def require_regular_file(path: str | Path, what: str = "", error: type[FusionError] = InputFileError) -> Path:
    """`path` exists and is a regular file (a link to one is fine); devices, FIFOs, sockets and folders are
    refused before anything opens them (opening a FIFO blocks until a writer appears). `error` is the
    `FusionError` subclass raised (callers keep their own error types)."""
    path = Path(path)
    label = _label(path, what)
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        raise error(f"{label}: not found") from None
    except OSError as e:
        raise error(f"{label}: cannot be read ({e.strerror})") from None
    _check_mode(mode, label, error)
    return path


def _depth(value: Any) -> int:
    """Nesting depth of parsed JSON, iteratively (a recursive walk would itself hit the recursion limit)."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, (dict, list)):
            deepest = max(deepest, depth)
            if depth > MAX_JSON_DEPTH:
                return depth
            stack.extend((child, depth + 1) for child in (item.values() if isinstance(item, dict) else item))
    return deepest


def parse_json(
    text: str | bytes, label: str, max_depth: int = MAX_JSON_DEPTH, error: type[FusionError] = InputFileError
) -> Any:
    """JSON text from `label` (a file or a request body), with the nesting bounded."""
    try:
        value = json.loads(text)
    except RecursionError:
        raise error(f"{label}: JSON nested deeper than {max_depth} levels; refusing it") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise error(f"{label}: invalid JSON ({e})") from None
    except ValueError as e:  # e.g. an integer of more than 4300 digits (Python's int-from-text limit)
        raise error(f"{label}: invalid JSON ({e})") from None
    if _depth(value) > max_depth:
        raise error(f"{label}: JSON nested deeper than {max_depth} levels; refusing it")
    return value


def read_bounded(
    path: str | Path, what: str = "", max_bytes: int = MAX_JSON_BYTES, error: type[FusionError] = InputFileError
) -> bytes:
    """The bytes of a regular file of at most `max_bytes` (`require_regular_file` first). Opened non-blocking and
    checked again on the open descriptor, so a file swapped for a FIFO after the first check cannot block us
    either; at most `max_bytes` + 1 bytes are read (the file may grow after the check). `error` is the
    `FusionError` subclass raised."""
    path = require_regular_file(path, what, error)
    label = _label(path, what)
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError:
        raise error(f"{label}: not found") from None
    except OSError as e:
        raise error(f"{label}: cannot be read ({e.strerror})") from None
    try:
        info = os.fstat(fd)
        _check_mode(info.st_mode, label, error)
        if info.st_size > max_bytes:
            raise error(f"{label}: {info.st_size} bytes, more than the {max_bytes} this file may have")
        with os.fdopen(fd, "rb", closefd=False) as f:
            data = f.read(max_bytes + 1)  # the file may grow between fstat and read
    except OSError as e:
        raise error(f"{label}: cannot be read ({e.strerror})") from None
    finally:
        os.close(fd)
    if len(data) > max_bytes:
        raise error(f"{label}: more than the {max_bytes} bytes this file may have")
    return data


def read_json(
    path: str | Path,
    what: str = "",
    max_bytes: int = MAX_JSON_BYTES,
    max_depth: int = MAX_JSON_DEPTH,
    expect: type | None = dict,
    error: type[FusionError] = InputFileError,
) -> Any:
    """A JSON file, bounded in size and depth; `expect` (default: an object) is the top-level type required;
    `error` is the `FusionError` subclass raised."""
    data = read_bounded(path, what, max_bytes, error)
    label = _label(Path(path), what)
    value = parse_json(data, label, max_depth, error)
    if expect is not None and not isinstance(value, expect):
        kind = {dict: "a JSON object", list: "a JSON list"}.get(expect, expect.__name__)
        raise error(f"{label}: expected {kind}, found {type(value).__name__}")
    return value


def open_safetensors(
    path: str | Path,
    what: str = "",
    framework: str = "pt",
    device: str = "cpu",
    error: type[FusionError] = InputFileError,
):
    """`safe_open` on a regular file, its header errors (truncated, corrupt, over the library's 100 MB header
    limit) reported with the file named. Use as `with open_safetensors(path) as f:`."""
    from safetensors import SafetensorError, safe_open

    path = require_regular_file(path, what, error)
    try:
        return safe_open(path, framework, device=device)
    except (SafetensorError, OSError, ValueError) as e:
        raise error(f"{_label(path, what)}: not a readable safetensors file ({e})") from None


def load_safetensors(path: str | Path, what: str = "", error: type[FusionError] = InputFileError) -> dict[str, Any]:
    """Every tensor of a safetensors file (torch), with `open_safetensors`' checks and errors."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = require_regular_file(path, what, error)
    try:
        return load_file(path)
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise error(f"{_label(path, what)}: not a readable safetensors file ({e})") from None


def read_tensor(
    path: str | Path, name: str, what: str = "", framework: str = "pt", error: type[FusionError] = InputFileError
) -> Any:
    """One named tensor of a safetensors file, with `open_safetensors`' checks; a missing or unreadable tensor is
    reported with the file and the tensor named."""
    from safetensors import SafetensorError

    label = _label(Path(path), what)
    with open_safetensors(path, what, framework, error=error) as f:
        if name not in f.keys():
            raise error(f"{label}: no tensor {name!r} (found: {', '.join(sorted(f.keys())[:8]) or 'none'})")
        try:
            return f.get_tensor(name)
        except (SafetensorError, OSError, ValueError, RuntimeError) as e:
            raise error(f"{label}: tensor {name!r} could not be read ({e})") from None


def relative_name(name: object, where: str, error: type[FusionError] = InputFileError) -> PurePosixPath:
    """A file name a manifest or index gives for a file of its own folder, checked as text before the file system
    is asked anything: a non-empty relative POSIX path with no `..` or `.` part, no backslash and no NUL."""
    if not isinstance(name, str) or not name or "\\" in name or "\0" in name:
        raise error(f"{where}: {name!r} is not a relative POSIX file name")
    parts = name.split("/")
    if name.startswith("/") or ".." in parts:
        raise error(f"{where}: {name!r} leaves the folder (an absolute path or '..'); refusing it")
    if any(part in ("", ".") for part in parts):
        raise error(f"{where}: {name!r} is not a plain relative path (an empty or '.' part)")
    return PurePosixPath(name)
