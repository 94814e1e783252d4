"""The ADM centre crop (docs/data.md#the-adm-centre-crop) and image decoding with the bad-data rules.

Every loader and the ``prepare`` tool go through these functions on the CPU, so all
paths agree pixel for pixel; the DALI loader reproduces the same geometry on the GPU
(``adm_geometry`` gives it the sizes) and is measured against ``adm_center_crop``.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from typing import Optional

import numpy as np
from PIL import Image

from ..errors import RepaEFastError

__all__ = ["adm_center_crop", "adm_geometry", "AdmGeometry", "decode_rgb", "check_image_size", "BadImage"]


class BadImage(RepaEFastError):
    """An image that cannot be used (unreadable, not an image, truncated, corrupt)."""


@dataclass(frozen=True)
class AdmGeometry:
    """The sizes the ADM crop goes through for one input image.

    ``halvings``: the sizes ``(w, h)`` after each BOX halving (may be empty);
    ``scaled``: ``(w, h)`` after the BICUBIC resize; ``left``/``top``: the crop corner
    in the scaled image.
    """

    halvings: tuple
    scaled: tuple
    left: int
    top: int


def adm_geometry(width: int, height: int, resolution: int) -> AdmGeometry:
    halvings = []
    while min(width, height) >= 2 * resolution:
        width, height = width // 2, height // 2
        halvings.append((width, height))
    scale = resolution / min(width, height)
    scaled = (round(width * scale), round(height * scale))
    return AdmGeometry(
        halvings=tuple(halvings),
        scaled=scaled,
        left=(scaled[0] - resolution) // 2,
        top=(scaled[1] - resolution) // 2,
    )


def adm_center_crop(image: Image.Image, resolution: int) -> Image.Image:
    """ADM centre crop, exactly as the official preprocessing does it (docs/data.md#the-adm-centre-crop).

    Repeated BOX halving while the short side is >= 2*resolution, then BICUBIC resize of
    the short side to ``resolution`` (sizes rounded), then the central square. Images
    smaller than ``resolution`` are upscaled by the same BICUBIC step.
    """
    while min(*image.size) >= 2 * resolution:
        image = image.resize(tuple(x // 2 for x in image.size), resample=Image.BOX)
    scale = resolution / min(*image.size)
    image = image.resize(tuple(round(x * scale) for x in image.size), resample=Image.BICUBIC)
    left = (image.size[0] - resolution) // 2
    top = (image.size[1] - resolution) // 2
    return image.crop((left, top, left + resolution, top + resolution))


# The ADM crop scales the short side to the crop size, so the resized image holds
# aspect-ratio x resolution^2 pixels: a tiny 100000 x 1 PNG would allocate gigabytes for
# a crop that keeps 1/100000 of it. Beyond this ratio an image is refused (PIL already
# refuses decompression bombs by pixel count).
MAX_ASPECT_RATIO = 32


def check_image_size(size: tuple) -> None:
    """Raise ``BadImage`` for a header size the ADM crop cannot use at bounded memory."""
    width, height = size
    if min(width, height) < 1 or max(width, height) > MAX_ASPECT_RATIO * min(width, height):
        raise BadImage(f"{width}x{height} is too elongated to crop (aspect ratio above {MAX_ASPECT_RATIO}:1)")


def decode_rgb(data: bytes) -> tuple[Image.Image, Optional[str]]:
    """Decode encoded image bytes to an RGB PIL image.

    Returns ``(image, note)``; ``note`` says what was converted (``None`` for a plain
    RGB image). Grayscale, CMYK, palette and 16-bit images are converted with PIL's
    ``convert("RGB")``; an alpha channel is dropped, not composited, exactly as the
    official preprocessing (``Image.open(f).convert("RGB")``) does. Raises ``BadImage``
    for anything PIL cannot fully decode (truncated data included: PIL's
    ``LOAD_TRUNCATED_IMAGES`` stays off).
    """
    try:
        image = Image.open(io.BytesIO(data))
    except Exception as exc:  # PIL raises many types (OSError, SyntaxError, ValueError...)
        raise BadImage(f"cannot decode ({type(exc).__name__}: {exc})") from None
    check_image_size(image.size)  # from the header, before any pixel is decoded
    try:
        image.load()
    except Exception as exc:
        raise BadImage(f"cannot decode ({type(exc).__name__}: {exc})") from None
    if image.mode == "RGB":
        return image, None
    note = f"converted {image.mode} to RGB" + (" (alpha dropped)" if "A" in image.mode or "transparency" in image.info else "")
    try:
        return image.convert("RGB"), note
    except Exception as exc:
        raise BadImage(f"cannot convert {image.mode} to RGB ({type(exc).__name__}: {exc})") from None


def to_chw(image: Image.Image) -> np.ndarray:
    """uint8 [3, H, W] (contiguous) from an RGB PIL image."""
    return np.ascontiguousarray(np.asarray(image, dtype=np.uint8).transpose(2, 0, 1))
