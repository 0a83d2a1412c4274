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

from PIL import Image, UnidentifiedImageError

from reference_model.errors import FusionError

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp"}
QUESTIONS_FILE = "questions.txt"
BUNDLED_QUESTIONS = Path(__file__).resolve().parent.parent / "assets" / "calibration_questions.txt"
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


def read_questions(path: Path) -> tuple[str, ...]:
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise CalibrationError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    except OSError as e:
        raise CalibrationError(f"{path}: cannot read ({e.strerror})") from None
    if "\0" in text:
        raise CalibrationError(f"{path}: binary content, expected one question per line")
    questions = tuple(line.strip() for line in text.splitlines() if line.strip())
    if not questions:
        raise CalibrationError(f"{path}: no questions (one question per line)")
    return questions


def _check_image(path: Path) -> None:
    try:
        with Image.open(path) as image:
            image.verify()  # reads the whole file: a truncated or corrupt image fails here, not mid-run
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


def load_calibration_set(calib: str | Path | None, num_samples: int) -> CalibrationSet:
    """The calibration requests, every file checked; refuses fewer distinct requests than samples asked."""
    if num_samples < 1:
        raise CalibrationError(f"--num-samples {num_samples}: must be >= 1")
    if calib is None:
        images, source = _bundled_images(), "bundled (scikit-image photos)"
        questions = read_questions(BUNDLED_QUESTIONS)
    else:
        folder = Path(calib)
        if not folder.is_dir():
            raise CalibrationError(f"--calib {folder}: not a folder")
        images = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
        if not images:
            raise CalibrationError(f"--calib {folder}: no images ({', '.join(sorted(IMAGE_SUFFIXES))})")
        own = folder / QUESTIONS_FILE
        questions = read_questions(own) if own.exists() else read_questions(BUNDLED_QUESTIONS)
        source = folder.resolve().name
    if len(images) < num_samples:
        raise CalibrationError(
            f"--num-samples {num_samples}: the calibration set {source!r} has only {len(images)} images "
            "(one image per sample)"
        )
    used = images[:num_samples]
    for image in used:
        _check_image(image)
    return CalibrationSet(source, tuple(used), questions, num_samples)
