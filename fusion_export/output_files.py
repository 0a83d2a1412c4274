"""Where a command may write, checked before it computes anything, and how it writes (atomically).

The rules, for every file or folder a command creates:
- never over one of the command's own inputs (the same file by any path, links included);
- never into a checkpoint, artifact or engine folder, nor below one;
- an existing file is replaced only when it is a regular file of the kind the command writes (its format
  marker says so) and is writable; anything else is refused with the flag named;
- the folder must take a new file (probed by creating one, which also catches read-only mounts and root);
- the result appears atomically (a hidden temp file renamed over the target) with the user's umask.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterable
from enum import Enum
from pathlib import Path

from reference_model.errors import FusionError
from reference_model.input_files import read_json, require_regular_file
from reference_model.staging import write_atomically

from .file_names import ENGINE_MANIFEST, MANIFEST

MAX_REPORT_BYTES = 64 << 20  # an existing JSON report larger than this is not one of ours; never read it whole


class OutputPathError(FusionError):
    """An output path that the command must not, or cannot, write."""


class OutputKind(Enum):
    """What a command writes, with the marker that identifies an existing file of that kind."""

    golden = ("fusion-export-golden", "golden outputs file")
    validation_report = ("fusion-export-validation-report", "validation report")
    trt_report = ("fusion-export-trt-check", "TensorRT check report")
    bench_report = ("fusion-export-bench", "benchmark report")
    bench_plot = ("fusion-export bench", "benchmark plot")  # PNGs: the marker is their Software text
    validation_plot = ("fusion-export validate", "validation plot")

    def __init__(self, marker: str, description: str):
        self.marker, self.description = marker, description

    def holds(self, path: Path) -> bool:
        """Is the existing regular file at `path` one this kind of output wrote? Never blocks, recurses or raises:
        a FIFO, device, huge or deeply nested file is simply not ours."""
        try:
            require_regular_file(path)  # opening a FIFO would block until a writer came
        except FusionError:
            return False
        if self is OutputKind.golden:
            from safetensors import safe_open

            try:
                with safe_open(path, "np") as f:
                    return (f.metadata() or {}).get("format") == self.marker
            except Exception:  # any unreadable file is simply not a golden file
                return False
        if self in (OutputKind.bench_plot, OutputKind.validation_plot):  # a PNG we wrote carries its text chunk
            return _png_text(path).get("Software") == self.marker
        try:
            document = read_json(path, max_bytes=MAX_REPORT_BYTES)  # bounded in size and nesting; an object
        except FusionError:
            return False
        return document.get("format") == self.marker


def _png_text(path: Path) -> dict[str, str]:
    try:
        from PIL import Image

        with Image.open(path) as image:
            return dict(getattr(image, "text", {}) or {})
    except Exception:  # not an image: not ours
        return {}


def protected_folder(folder: Path) -> str | None:
    """'an artifact folder', 'an engine folder' or 'a checkpoint folder' when `folder` is one, else None."""
    if (folder / MANIFEST).is_file():
        return "an artifact folder"
    if (folder / ENGINE_MANIFEST).is_file():
        return "an engine folder"
    if (folder / "config.json").is_file() and any(
        (folder / name).is_file() for name in ("model.safetensors", "model.safetensors.index.json")
    ):
        return "a checkpoint folder"
    return None


def _same(a: Path, b: Path) -> bool:
    try:
        return a.exists() and b.exists() and os.path.samefile(a, b)
    except OSError:
        return False


def _inside(path: Path, folder: Path) -> bool:
    path, folder = path.resolve(), folder.resolve()
    return path == folder or folder in path.parents


def _probe_writable(folder: Path, flag: str) -> None:
    try:
        fd, probe = tempfile.mkstemp(dir=folder, prefix=".fusion-export-probe-")
    except OSError as e:
        raise OutputPathError(f"{flag} {folder}: cannot create files in this folder ({e.strerror})") from None
    os.close(fd)
    os.unlink(probe)


def _nearest_existing(path: Path, flag: str, target: Path) -> Path:
    """The closest existing ancestor of `path`, which must be a folder (parents are created at write time)."""
    for parent in path.parents:
        if parent.exists():
            if not parent.is_dir():
                raise OutputPathError(f"{flag} {target}: {parent} is a file, not a folder")
            return parent
    raise OutputPathError(f"{flag} {target}: no existing folder above it")  # unreachable for absolute paths


def _check_location(path: Path, flag: str, inputs: Iterable[Path | str]) -> None:
    """Rules shared by files and folders: not an input, not inside an input folder or a protected folder."""
    inputs = [Path(item) for item in inputs]
    for item in inputs:
        if _same(path, item) or path.resolve() == item.resolve():
            raise OutputPathError(f"{flag} {path} is one of this command's inputs; refusing to overwrite it")
    for folder in path.resolve().parents:
        kind = protected_folder(folder)
        if kind:
            raise OutputPathError(f"{flag} {path}: {folder} is {kind}; outputs never go into one")
    for item in inputs:
        if item.is_dir() and _inside(path, item):
            raise OutputPathError(f"{flag} {path} is inside the input folder {item}; choose a path outside it")


def check_output_file(path: str | Path, flag: str, kind: OutputKind, inputs: Iterable[Path | str] = ()) -> Path:
    """Refuse, before any work, an output file this command must not or cannot write (module docstring)."""
    path = Path(path)
    _check_location(path, flag, inputs)
    if path.is_dir():
        raise OutputPathError(f"{flag} {path} is a folder; give a file path")
    if path.exists() or path.is_symlink():
        if not path.is_file():
            raise OutputPathError(f"{flag} {path} exists and is not a regular file; refusing to replace it")
        if not kind.holds(path):
            raise OutputPathError(
                f"{flag} {path} exists and is not a {kind.description}; refusing to overwrite it "
                "(remove it or choose another path)"
            )
        if not os.access(path, os.W_OK):
            raise OutputPathError(f"{flag} {path} exists and is read-only; refusing to replace it")
    _probe_writable(_nearest_existing(path, flag, path), flag)
    return path


def check_output_folder(path: str | Path, flag: str, inputs: Iterable[Path | str] = ()) -> Path:
    """A folder the command will create (it must not exist yet) under the same rules as files."""
    path = Path(path)
    _check_location(path, flag, inputs)
    if path.exists():
        raise OutputPathError(f"{flag} {path}: already exists; choose a new folder or remove it")
    _probe_writable(_nearest_existing(path, flag, path), flag)
    return path


def check_timing_cache_file(path: str | Path, flag: str, inputs: Iterable[Path | str], out_dir: Path | None) -> Path:
    """A cache file the command reads and replaces: a regular, readable, writable file or none yet, in a folder that
    takes new files (the cache is replaced atomically), under the rules of every output (not an input, not inside an
    input, artifact, engine or checkpoint folder), and never inside `out_dir` (a folder the command creates)."""
    path = Path(path)
    _check_location(path, flag, inputs)
    if out_dir is not None and _inside(path, out_dir):
        raise OutputPathError(f"{flag} {path} is inside --out {out_dir}; keep the cache outside the engine folder")
    if path.exists() or path.is_symlink():
        if not path.is_file():
            raise OutputPathError(f"{flag} {path} exists and is not a regular file; refusing to read or replace it")
        try:
            with open(path, "rb") as f:
                f.read(1)
        except OSError as e:
            raise OutputPathError(f"{flag} {path}: cannot read it ({e.strerror})") from None
        if not os.access(path, os.W_OK):
            raise OutputPathError(f"{flag} {path} is read-only; refusing to replace it (give a writable file)")
    _probe_writable(_nearest_existing(path, flag, path), flag)
    return path


def write_json(path: str | Path, kind: OutputKind, content: dict) -> Path:
    """A JSON report of `kind`, its format marker first, written atomically."""
    document = {"format": kind.marker, **content}
    return write_atomically(path, lambda tmp: tmp.write_text(json.dumps(document, indent=2) + "\n"))
