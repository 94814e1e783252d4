"""The embedded demo dataset: a small class-conditional ImageNet-style JPEG folder.

Generated procedurally on first use (NumPy + PIL, seeded, deterministic) into a cache
directory, so demos and tests need no download. Each class is one shape in one colour
(10 shapes x golden-ratio hues), drawn at a random position, scale and rotation on a
random low-saturation gradient background with noise; image sides vary from ``size`` to
``4*size`` pixels so the ADM crop really resizes. The shape always stays inside the
central square, so the centre crop keeps it, and classes are easy to tell apart at 64 px.
"""

from __future__ import annotations

import colorsys
import math
import os
import secrets
import shutil
from pathlib import Path
from typing import Optional

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

__all__ = ["ensure_demo_dataset", "default_cache_dir", "render_photo_like", "DEMO_SHAPES"]

DEMO_VERSION = 1
DEMO_SHAPES = ("circle", "square", "triangle", "plus", "ring", "diamond", "star", "stripes",
               "hexagon", "cross")


def default_cache_dir() -> Path:
    return Path(os.environ.get("REPA_E_FAST_CACHE", Path.home() / ".cache" / "repa_e_fast"))


def _class_colour(class_index: int) -> tuple:
    hue = (class_index * 0.618033988749895) % 1.0  # golden ratio: well spread hues
    r, g, b = colorsys.hsv_to_rgb(hue, 0.85, 0.95)
    return np.array([r, g, b]) * 255.0


def _polygon(cx, cy, radius, sides, rotation, inner=None):
    """Vertices of a regular polygon (or a star when ``inner`` radius is given)."""
    points = []
    count = sides * 2 if inner else sides
    for k in range(count):
        angle = rotation + 2 * math.pi * k / count
        r = (inner if inner and k % 2 else radius)
        points.append((cx + r * math.cos(angle), cy + r * math.sin(angle)))
    return points


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, r: float,
                rotation: float, colour: tuple, background: tuple) -> None:
    box = (cx - r, cy - r, cx + r, cy + r)
    if shape == "circle":
        draw.ellipse(box, fill=colour)
    elif shape == "square":
        draw.polygon(_polygon(cx, cy, r * 1.2, 4, rotation + math.pi / 4), fill=colour)
    elif shape == "triangle":
        draw.polygon(_polygon(cx, cy, r * 1.2, 3, rotation - math.pi / 2), fill=colour)
    elif shape == "diamond":
        draw.polygon(_polygon(cx, cy, r * 1.1, 4, 0.0), fill=colour)
    elif shape == "hexagon":
        draw.polygon(_polygon(cx, cy, r, 6, rotation), fill=colour)
    elif shape == "star":
        draw.polygon(_polygon(cx, cy, r * 1.15, 5, rotation - math.pi / 2, inner=r * 0.45), fill=colour)
    elif shape == "ring":
        draw.ellipse(box, fill=colour)
        k = r * 0.5
        draw.ellipse((cx - k, cy - k, cx + k, cy + k), fill=background)
    elif shape in ("plus", "cross"):
        w = r * 0.35
        arms = [(-r, -w, r, w), (-w, -r, w, r)]
        # Small tilt only, so a "plus" never turns into a "cross".
        angle = (rotation / (2 * math.pi) - 0.5) * 0.3 + (math.pi / 4 if shape == "cross" else 0.0)
        c, s = math.cos(angle), math.sin(angle)
        for x0, y0, x1, y1 in arms:
            corners = [(x0, y0), (x1, y0), (x1, y1), (x0, y1)]
            draw.polygon([(cx + x * c - y * s, cy + x * s + y * c) for x, y in corners], fill=colour)
    elif shape == "stripes":
        h = 2 * r / 5
        for k in (0, 2, 4):
            y0 = cy - r + k * h
            draw.rectangle((cx - r, y0, cx + r, y0 + h), fill=colour)
    else:
        raise ValueError(f"unknown demo shape {shape!r}")


def render_demo_image(class_index: int, image_index: int, size: int) -> Image.Image:
    """One demo image (deterministic in its arguments)."""
    rng = np.random.default_rng([20250601, class_index, image_index, size])
    short = int(rng.integers(size, 2 * size + 1))
    long = int(min(4 * size, round(short * rng.uniform(1.0, 1.6))))
    width, height = (long, short) if rng.random() < 0.5 else (short, long)

    # Background: a gradient between two dull colours, plus mild noise.
    c0, c1 = rng.uniform(40, 200, 3), rng.uniform(40, 200, 3)
    grey0, grey1 = c0.mean(), c1.mean()
    c0, c1 = 0.4 * c0 + 0.6 * grey0, 0.4 * c1 + 0.6 * grey1  # low saturation
    angle = rng.uniform(0, 2 * math.pi)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    t = (xx * math.cos(angle) + yy * math.sin(angle))
    t = (t - t.min()) / max(float(np.ptp(t)), 1.0)
    background = c0[None, None] * (1 - t[..., None]) + c1[None, None] * t[..., None]
    background += rng.normal(0, 6, background.shape)
    image = Image.fromarray(np.clip(background, 0, 255).astype(np.uint8))

    shape = DEMO_SHAPES[class_index % len(DEMO_SHAPES)]
    colour = np.clip(_class_colour(class_index) * rng.uniform(0.8, 1.05), 0, 255)
    radius = short * rng.uniform(0.18, 0.3)
    cx = width / 2 + rng.uniform(-0.12, 0.12) * short
    cy = height / 2 + rng.uniform(-0.12, 0.12) * short
    draw = ImageDraw.Draw(image)
    background_colour = tuple(int(v) for v in background[int(cy), int(cx)].clip(0, 255))
    _draw_shape(draw, shape, cx, cy, radius, rng.uniform(0, 2 * math.pi),
                tuple(int(v) for v in colour), background_colour)
    return image


def ensure_demo_dataset(root: Optional[os.PathLike] = None, num_classes: int = 10,
                        images_per_class: int = 40, size: int = 64) -> Path:
    """Path of the demo image folder, generating it on first use.

    ``root``: the cache directory (default ``$REPA_E_FAST_CACHE`` or
    ``~/.cache/repa_e_fast``); the dataset goes to ``root/demo-c<classes>-n<images>-s<size>-v1``
    with one folder per class (``000_circle``, ...) of JPEGs. Built in a temporary
    directory and renamed into place, so concurrent callers are safe: one rename wins,
    the others discard their copy.
    """
    for name, value in (("num_classes", num_classes), ("images_per_class", images_per_class), ("size", size)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"ensure_demo_dataset: {name} must be an int >= 1, got {value!r}")
    cache = Path(root) if root is not None else default_cache_dir()
    final = cache / f"demo-c{num_classes}-n{images_per_class}-s{size}-v{DEMO_VERSION}"
    if final.is_dir():
        return final
    cache.mkdir(parents=True, exist_ok=True)
    tmp = cache / f".{final.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}"
    try:
        for c in range(num_classes):
            class_dir = tmp / f"{c:03d}_{DEMO_SHAPES[c % len(DEMO_SHAPES)]}"
            class_dir.mkdir(parents=True)
            for i in range(images_per_class):
                render_demo_image(c, i, size).save(class_dir / f"img_{i:04d}.JPEG", quality=90)
        try:
            os.rename(tmp, final)
        except OSError:
            if not final.is_dir():  # not "someone else finished first": a real error
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def render_photo_like(width: int, height: int, seed: int) -> Image.Image:
    """A synthetic photograph-like image: smooth colour fields, shapes (edges), blur, noise.

    For crop-fidelity tests and loader benchmarks where no real photographs are at hand:
    it has what matters to resampling and decoding (smooth areas, sharp edges, fine
    texture). Deterministic in its arguments.
    """
    rng = np.random.default_rng(seed)
    # Smooth colour fields are computed at 1/4 size and upsampled (they are smooth).
    small_w, small_h = max(1, width // 4), max(1, height // 4)
    x = np.arange(small_w, dtype=np.float32)[None, :]
    y = np.arange(small_h, dtype=np.float32)[:, None]
    channels = []
    for _ in range(3):
        channel = np.full((small_h, small_w), rng.uniform(60, 190), np.float32)
        for _ in range(4):
            fx, fy = rng.uniform(0.5, 4, 2) / max(small_w, small_h)
            amplitude, phase = rng.uniform(20, 50), rng.uniform(0, 6.3)
            channel += amplitude * np.sin(2 * np.pi * (fx * x + fy * y) + phase)
        channels.append(channel)
    field = np.clip(np.stack(channels, axis=-1), 0, 255).astype(np.uint8)
    image = Image.fromarray(field).resize((width, height), Image.BILINEAR)
    draw = ImageDraw.Draw(image)
    for _ in range(int(rng.integers(5, 15))):
        x0, y0 = rng.uniform(0, width), rng.uniform(0, height)
        s = rng.uniform(0.05, 0.4) * min(width, height)
        colour = tuple(int(v) for v in rng.integers(0, 256, 3))
        if rng.random() < 0.5:
            draw.ellipse([x0, y0, x0 + s, y0 + s * rng.uniform(0.5, 1.5)], fill=colour)
        else:
            draw.polygon([(x0 + rng.uniform(-s, s), y0 + rng.uniform(-s, s)) for _ in range(3)], fill=colour)
    image = image.filter(ImageFilter.GaussianBlur(rng.uniform(0.3, 1.2)))
    # Fine texture: uniform integer noise (cheap for multi-megapixel images).
    k = int(rng.integers(4, 13))
    noise = rng.integers(0, 2 * k + 1, (height, width, 3), dtype=np.uint8).astype(np.int16) - k
    pixels = np.asarray(image).astype(np.int16) + noise
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))
