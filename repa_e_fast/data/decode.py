"""CPU decoding of one batch: read, decode, convert, ADM-crop, flip, replace bad images.

Used by the PyTorch loader (inside DataLoader workers) and by the DALI loader for a batch
DALI failed to decode. Problems are returned as events, not logged here: the loader
counts and logs them once per file in the main process.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from .crop import BadImage, adm_center_crop, decode_rgb, to_chw
from .order import MAX_CONSECUTIVE_BAD, SampleOrder
from .sources import DatasetError

__all__ = ["Event", "load_image", "decode_batch"]


class Event(NamedTuple):
    """Something about one image: kind is "bad" (skipped), "converted" or "small"."""

    kind: str
    index: int
    name: str
    message: str


def load_image(source, index: int, resolution: int) -> tuple[np.ndarray, list]:
    """uint8 [3, R, R] for dataset image ``index``; raises ``BadImage``."""
    try:
        data = source.read(index)
    except OSError as exc:  # missing file, permissions, short shard
        raise BadImage(f"cannot read ({type(exc).__name__}: {exc})") from None
    image, note = decode_rgb(data)
    events = []
    if note is not None:
        events.append(Event("converted", index, source.name(index), note))
    if min(image.size) < resolution:
        events.append(Event("small", index, source.name(index),
                            f"{image.size[0]}x{image.size[1]} upscaled to {resolution}"))
    if image.size != (resolution, resolution):
        image = adm_center_crop(image, resolution)
    return to_chw(image), events


def decode_batch(source, order: SampleOrder, epoch: int, batch: int, resolution: int,
                 hflip: bool):
    """Images ``[n, 3, R, R]`` uint8, labels int64, indices int64 and events of one batch."""
    positions = order.batch_positions(batch)
    images = np.empty((len(positions), 3, resolution, resolution), dtype=np.uint8)
    indices = np.empty(len(positions), dtype=np.int64)
    flips = order.flips(epoch)[positions] if hflip else None
    events = []
    for slot, position in enumerate(positions):
        for index in order.candidates(epoch, int(position)):
            try:
                chw, notes = load_image(source, index, resolution)
            except BadImage as exc:
                events.append(Event("bad", index, source.name(index), str(exc)))
                continue
            events.extend(notes)
            break
        else:
            raise DatasetError(
                f"more than {MAX_CONSECUTIVE_BAD} consecutive images in a row cannot be read "
                f"(last: {source.name(index)}); the dataset is broken"
            )
        images[slot] = chw[:, :, ::-1] if flips is not None and flips[slot] else chw
        indices[slot] = index
    return images, source.labels[indices], indices, events
