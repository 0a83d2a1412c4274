"""static_hd image preprocessing (FUSION_SPEC section 2), bit-exact with upstream.

Crops 0..3 are the 2x2 tiles of the image resized to twice the crop size; crop 4 is the whole image resized
to the crop size (aspect ratio not kept). Both resizes use PIL's default filter (BICUBIC). Pixels are scaled
by 1/255 in float64, rounded to float32, then normalised with mean = std = 0.5.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from .errors import FusionError


class ImageError(FusionError):
    """An image file cannot be read."""


def open_image(image: Image.Image | str | Path) -> Image.Image:
    if isinstance(image, Image.Image):
        return image.convert("RGB")
    try:
        with Image.open(image) as im:
            return im.convert("RGB")
    except FileNotFoundError:
        raise ImageError(f"{image}: image file not found") from None
    except (UnidentifiedImageError, OSError) as e:
        raise ImageError(f"{image}: not a readable image ({e})") from None


def _normalise(crop: Image.Image) -> torch.Tensor:
    x = (np.asarray(crop, dtype=np.float64) * (1 / 255)).astype(np.float32)  # (H, W, 3)
    x = (x - np.float32(0.5)) / np.float32(0.5)
    return torch.from_numpy(np.ascontiguousarray(x.transpose(2, 0, 1)))  # (3, H, W)


def static_hd_crops(image: Image.Image | str | Path, crop_size: int = 384) -> torch.Tensor:
    """(5, 3, crop_size, crop_size) float32: four tiles of the 2x-resized image, then the whole image."""
    image = open_image(image)
    big = image.resize((2 * crop_size, 2 * crop_size))
    tiles = [
        big.crop((c * crop_size, r * crop_size, (c + 1) * crop_size, (r + 1) * crop_size))
        for r in range(2)
        for c in range(2)
    ]
    whole = image.resize((crop_size, crop_size))
    return torch.stack([_normalise(crop) for crop in [*tiles, whole]])
