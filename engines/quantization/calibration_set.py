"""The requests calibration runs: one image per sample, each with the next question (questions cycle).

`--calib DIR`: every .png/.jpg/.jpeg/.webp/.bmp in DIR (sorted), and DIR/questions.txt (one question per line)
or, without it, the bundled question list. Without `--calib`: the bundled default that works offline, the
photographs shipped inside scikit-image's wheel (`skimage/data`, no download) with the bundled questions.
Everything is opened and checked before any compute, so a bad file is named up front.
"""

from __future__ import annotations

import hashlib
import importlib.util
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image, UnidentifiedImageError

from fusion_export.bundled import BUNDLED_QUESTIONS
from fusion_export.containment import contained_path
from reference_model.errors import FusionError
from reference_model.image_preprocessing import check_size, pillow_limit_off, require_image_file
from reference_model.input_files import read_bounded
from reference_model.limits import DEFAULT_MAX_IMAGE_PIXELS

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp"}
QUESTIONS_FILE = "questions.txt"
MAX_QUESTIONS_BYTES = 16 << 20  # calibration asks at most a few thousand one-line questions
# scikit-image's bundled photographs (in the wheel itself; its larger datasets need a download and are not used)
SKIMAGE_PHOTOS = ("astronaut.png", "chelsea.png", "coffee.png", "rocket.jpg", "motorcycle_left.png", "horse.png",
                  "hubble_deep_field.jpg", "retina.jpg", "camera.png", "coins.png", "moon.png", "page.png",
                  "text.png", "ihc.png", "brick.png", "grass.png", "gravel.png", "color.png")  # fmt: skip


class CalibrationError(FusionError):
    """Calibration input that cannot be used (named), found before any work."""


@dataclass(frozen=True)
class CalibrationSet:
    source: str  # what the manifest records: a folder name or the bundled default
    images: tuple[Path, ...]
    questions: tuple[str, ...]
    num_samples: int

    def samples(self) -> list[tuple[Path, str]]:
        return [(self.images[i % len(self.images)], self.questions[i % len(self.questions)])
                for i in range(self.num_samples)]  # fmt: skip

    def digest(self) -> str:
        """sha256 over the images' bytes and the questions, in sample order."""
        h = hashlib.sha256()
        for image, question in self.samples():
            h.update(hashlib.sha256(image.read_bytes()).digest())
            h.update(question.encode() + b"\0")
        return h.hexdigest()


def read_questions(path: Path, tokenizer: Any = None) -> tuple[str, ...]:
    """One question per line (blank lines skipped), each held to the rule every question from outside follows
    (`reference_model.prompt`: plain text, no template markers; with `tokenizer`, also tokenized as it will be
    run), so a bad line is named by file and line before any work."""
    from reference_model.prompt import RequestError, check_question, encode_question

    data = read_bounded(path, max_bytes=MAX_QUESTIONS_BYTES, error=CalibrationError)  # a FIFO is refused, not read
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise CalibrationError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    if "\0" in text:
        raise CalibrationError(f"{path}: binary content, expected one question per line")
    questions = []
    for number, line in enumerate(text.splitlines(), start=1):
        question = line.strip()
        if not question:
            continue
        try:
            check_question(question) if tokenizer is None else encode_question(question, tokenizer)
        except RequestError as e:
            raise CalibrationError(f"{path}:{number}: {e}") from None
        questions.append(question)
    if not questions:
        raise CalibrationError(f"{path}: no questions (one question per line)")
    return tuple(questions)


def _check_image(path: Path, max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS) -> None:
    """A regular file holding a readable image of at most `max_pixels`, its size read from the header before
    anything is decoded (a decompression bomb is refused here, not when calibration decodes it)."""
    require_image_file(path, error=CalibrationError)
    try:
        with pillow_limit_off(), Image.open(path) as image:
            check_size(image, str(path), max_pixels, error=CalibrationError)  # from the header: nothing decoded yet
            image.verify()  # reads the whole file: a truncated or corrupt image fails here, not mid-run
    except CalibrationError:
        raise
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise CalibrationError(f"{path}: not a readable image ({e})") from None


def _bundled_images() -> list[Path]:
    spec = importlib.util.find_spec("skimage")
    if spec is None or spec.origin is None:
        raise CalibrationError(
            "the bundled calibration photos come from scikit-image (pip install 'fusion-export[quantize]'); "
            "or give --calib DIR with your own images"
        )
    folder = Path(spec.origin).parent / "data"
    return [folder / name for name in SKIMAGE_PHOTOS if (folder / name).is_file()]


def load_calibration_set(
    calib: str | Path | None, num_samples: int, max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS, tokenizer: Any = None
) -> CalibrationSet:
    """The calibration requests, every file checked (images: regular files of at most `max_pixels`, sized from
    their headers; questions tokenized with `tokenizer` when given); refuses fewer distinct requests than
    samples asked."""
    if num_samples < 1:
        raise CalibrationError(f"--num-samples {num_samples}: must be >= 1")
    if calib is None:
        images, source = _bundled_images(), "bundled (scikit-image photos)"
        questions = read_questions(BUNDLED_QUESTIONS, tokenizer)
    else:
        folder = Path(calib)
        if not folder.is_dir():
            raise CalibrationError(f"--calib {folder}: not a folder")
        # by name, so a FIFO or device called x.png is refused below, not skipped (nor opened)
        images = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and not p.is_dir())
        if not images:
            raise CalibrationError(f"--calib {folder}: no images ({', '.join(sorted(IMAGE_SUFFIXES))})")
        own = folder / QUESTIONS_FILE
        # the containment rule (containment.py): what the folder holds is read only if it stays inside it
        for entry in [*images, *([own] if own.exists() or own.is_symlink() else [])]:
            contained_path(folder, entry.name, f"--calib {folder}")
        questions = read_questions(own if own.exists() or own.is_symlink() else BUNDLED_QUESTIONS, tokenizer)
        source = folder.resolve().name
    if len(images) < num_samples:
        raise CalibrationError(
            f"--num-samples {num_samples}: the calibration set {source!r} has only {len(images)} images "
            "(one image per sample)"
        )
    used = images[:num_samples]
    for image in used:
        _check_image(image, max_pixels)
    return CalibrationSet(source, tuple(used), questions, num_samples)
