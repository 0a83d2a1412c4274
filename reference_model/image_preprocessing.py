"""static_hd image preprocessing (docs/semantics.md section 2), bit-exact with upstream.

Crops 0..3 are the 2x2 tiles of the image resized to twice the crop size; crop 4 is the whole image resized
to the crop size (aspect ratio not kept). Both resizes use PIL's default filter (BICUBIC). Pixels are scaled
by 1/255 in float64, rounded to float32, then normalised with mean = std = 0.5.

Upstream converts with `Image.convert("RGB")`, which is right for 8-bit images and wrong for wider ones (a
16-bit greyscale PNG clips to white). Here 16-bit greyscale is scaled to 8 bits first; 32-bit integer and float
images are accepted only when their values are 8-bit data, since they carry no display range. Images larger
than a pixel limit are refused before they are decoded.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from .errors import FusionError
from .input_files import require_regular_file
from .limits import DEFAULT_MAX_IMAGE_PIXELS

SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N")


class ImageError(FusionError):
    """An image file cannot be read, or is outside what preprocessing accepts."""


@contextmanager
def pillow_limit_off():
    """Our own limit replaces Pillow's decompression-bomb check (which raises an untyped error at 2x its own)."""
    saved = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = None
    try:
        yield
    finally:
        Image.MAX_IMAGE_PIXELS = saved


def check_size(image: Image.Image, name: str, max_pixels: int, error: type[FusionError] = ImageError) -> None:
    """At most `max_pixels` and at least one: `image.size` comes from the header, so a decompression bomb is refused
    before any pixel is decoded. `error` is the `FusionError` subclass raised (callers keep their own types)."""
    width, height = image.size
    if width * height > max_pixels:
        raise error(
            f"{name}: {width}x{height} = {width * height:,} pixels, over the limit of {max_pixels:,} "
            "(raise it with --max-image-pixels)"
        )
    if width < 1 or height < 1:
        raise error(f"{name}: image has no pixels ({width}x{height})")


def to_rgb(image: Image.Image, name: str = "image") -> Image.Image:
    """8-bit RGB, converting high-bit-depth greyscale correctly instead of clipping it."""
    if image.mode in SIXTEEN_BIT_MODES:
        wide = np.asarray(image).astype(np.uint32)
        grey = ((wide * 255 + 32767) // 65535).astype(np.uint8)  # round(v * 255 / 65535)
        return Image.fromarray(grey).convert("RGB")
    if image.mode in ("I", "F"):
        values = np.asarray(image)
        if values.size and (values.min() < 0 or values.max() > 255 or not np.array_equal(values, np.round(values))):
            kind = "32-bit integer" if image.mode == "I" else "floating-point"
            raise ImageError(
                f"{name}: {kind} pixels (mode {image.mode}, values {values.min()}..{values.max()}) have no defined "
                "display range; save the image as 8- or 16-bit first"
            )
        return Image.fromarray(values.astype(np.uint8)).convert("RGB")
    try:
        return image.convert("RGB")
    except ValueError as e:
        raise ImageError(f"{name}: mode {image.mode} cannot be converted to RGB ({e})") from None


def require_image_file(path: str | Path, error: type[FusionError] = ImageError) -> None:
    """A regular file (a link to one is fine), checked before anything opens it: opening a FIFO blocks until a
    writer comes, and a device can stream forever. `error` is the `FusionError` subclass raised."""
    if not os.path.lexists(path):
        raise error(f"{path}: image file not found")
    require_regular_file(path, error=error)


def open_image(image: Image.Image | str | Path, max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS) -> Image.Image:
    """An RGB image from a file or a PIL image, size-checked before decoding."""
    if isinstance(image, Image.Image):
        check_size(image, "image", max_pixels)
        return to_rgb(image)
    if isinstance(image, (str, os.PathLike)):
        require_image_file(image)
    try:
        with pillow_limit_off(), Image.open(image) as im:
            check_size(im, str(image), max_pixels)  # the header is read; the pixels are not yet
            im.load()
            return to_rgb(im, str(image))
    except ImageError:
        raise
    except FileNotFoundError:
        raise ImageError(f"{image}: image file not found") from None
    except IsADirectoryError:
        raise ImageError(f"{image}: is a folder, not an image file") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:  # Pillow's decoders raise all of these
        raise ImageError(f"{image}: not a readable image ({type(e).__name__}: {e})") from None


def _normalise(crop: Image.Image) -> torch.Tensor:
    x = (np.asarray(crop, dtype=np.float64) * (1 / 255)).astype(np.float32)  # (H, W, 3)
    x = (x - np.float32(0.5)) / np.float32(0.5)
    return torch.from_numpy(np.ascontiguousarray(x.transpose(2, 0, 1)))  # (3, H, W)


def static_hd_crops(
    image: Image.Image | str | Path, crop_size: int = 384, max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS
) -> torch.Tensor:
    """(5, 3, crop_size, crop_size) float32: four tiles of the 2x-resized image, then the whole image."""
    image = open_image(image, max_pixels)
    big = image.resize((2 * crop_size, 2 * crop_size))
    tiles = [
        big.crop((c * crop_size, r * crop_size, (c + 1) * crop_size, (r + 1) * crop_size))
        for r in range(2)
        for c in range(2)
    ]
    whole = image.resize((crop_size, crop_size))
    return torch.stack([_normalise(crop) for crop in [*tiles, whole]])
