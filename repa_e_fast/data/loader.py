"""``build_image_loader``: the one entry point the trainer uses, and the shared loader base.

Every loader yields ``(images, labels)`` (or ``(images, labels, indices)``): ``uint8
[B, 3, R, R]`` contiguous and ``int64 [B]`` on ``device``. ``for batch in loader`` runs
from the cursor to the end of the current epoch, then moves to the next epoch; breaking
out keeps the cursor after the last batch handed out. ``state_dict()`` is that cursor
plus the settings that define the order; a new loader given it with ``load_state_dict``
yields next exactly the batch the old one would have.
"""

from __future__ import annotations

import logging
import os
from typing import Iterator, Optional

import torch

from .decode import Event
from .order import OrderCursor, SampleOrder
from .sources import DatasetError, open_source

logger = logging.getLogger("repa_e_fast.data")

__all__ = ["build_image_loader", "ImageLoaderBase", "dali_available"]

STATE_VERSION = 1


def dali_available() -> bool:
    try:
        import nvidia.dali  # noqa: F401, PLC0415
    except ImportError:
        return False
    return True


class ImageLoaderBase(OrderCursor):
    """Cursor, order, state and bad-data bookkeeping shared by the torch and DALI loaders.

    Subclasses implement ``_batches(start)``: a generator of ``(images, labels, indices,
    events)`` for this epoch's batches ``start, start+1, ...`` (tensors on the device).
    """

    kind = "base"  # which loader: "dali" or "torch"

    def __init__(self, source, order: SampleOrder, *, resolution: int, device: torch.device,
                 hflip: bool, return_indices: bool):
        self.source = source
        self.order = order
        self.resolution = int(resolution)
        self.device = torch.device(device)
        self.hflip = bool(hflip)
        self.return_indices = bool(return_indices)
        self._epoch = 0
        self._position = 0  # batches of the current epoch already handed out
        self._seen: dict = {"bad": set(), "converted": set(), "small": set()}
        self._skipped = 0  # times an unusable image was met (and skipped)
        self._fallback_batches = 0
        self._generation = 0  # bumped by load_state_dict: a running loop stops

    # ---------------------------------------------------------------- sizes

    @property
    def num_classes(self) -> int:
        return self.source.num_classes

    @property
    def num_images(self) -> int:
        return self.source.num_images

    # ---------------------------------------------------------------- iteration

    def __iter__(self) -> Iterator:
        generation = self._generation
        for images, labels, indices, events in self._batches(self._position):
            self._record(events)
            # Advance before yielding: a state_dict() taken while the caller holds this
            # batch already points at the next one.
            self._position += 1
            yield (images, labels, indices) if self.return_indices else (images, labels)
            if self._generation != generation:  # load_state_dict() moved the cursor
                return
        if self._position >= self.order.num_batches:
            self._epoch += 1
            self._position = 0

    def _batches(self, start: int):
        # The one abstract hook of the base class (see the class docstring).
        raise NotImplementedError(f"{type(self).__name__} must implement _batches(start)")

    # ---------------------------------------------------------------- state

    def state_dict(self) -> dict:
        return {
            "version": STATE_VERSION,
            "epoch": self._epoch,
            "position": self._position,
            **self.order.settings(),
            "num_images": self.num_images,
            "num_batches": self.order.num_batches,
            "resolution": self.resolution,
            "hflip": self.hflip,
        }

    def load_state_dict(self, state: dict) -> None:
        """Continue where the loader that wrote ``state`` stopped.

        The settings that define the order must match (seed, shuffle, drop_last,
        batch_size, world_size, num_images, hflip); the rank may differ.
        """
        mine = self.state_dict()
        for key in ("seed", "shuffle", "drop_last", "batch_size", "world_size", "num_images", "hflip"):
            if key not in state:
                raise ValueError(f"image loader state_dict lacks '{key}'")
            if state[key] != mine[key]:
                raise ValueError(
                    f"cannot resume the image loader: the state has {key}={state[key]!r}, "
                    f"this loader has {key}={mine[key]!r}"
                )
        epoch, position = int(state["epoch"]), int(state["position"])
        if epoch < 0 or not 0 <= position <= self.order.num_batches:
            raise ValueError(f"bad loader cursor epoch={epoch} position={position}")
        self._epoch, self._position = epoch, position
        self._generation += 1
        self._cursor_moved()

    def _cursor_moved(self) -> None:
        """Hook: the cursor was set from outside (DALI drops what it prefetched)."""

    # ---------------------------------------------------------------- bad data

    def _record(self, events) -> None:
        for event in events:
            event = Event(*event)
            if event.kind == "bad":
                self._skipped += 1
            seen = self._seen[event.kind]
            if event.index in seen:
                continue
            seen.add(event.index)
            if event.kind == "bad":
                logger.warning("skipping unusable image %s: %s (replaced by the next good "
                               "image of the epoch order)", event.name, event.message)
            elif event.kind == "converted":
                logger.warning("image %s: %s", event.name, event.message)
            else:
                logger.info("image %s is smaller than the crop: %s", event.name, event.message)

    @property
    def stats(self) -> dict:
        """Counters: distinct files skipped (bad_images), converted, smaller than the crop;
        skipped_reads counts every time an unusable image was met (each epoch)."""
        return {
            "bad_images": len(self._seen["bad"]),
            "converted_images": len(self._seen["converted"]),
            "small_images": len(self._seen["small"]),
            "skipped_reads": self._skipped,
            "empty_class_dirs": len(self.source.empty_class_dirs),
            "cpu_fallback_batches": self._fallback_batches,
        }

    def close(self) -> None:
        """Release workers / pipelines (also done when the loader is garbage collected)."""

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}({self.source.kind} '{getattr(self.source, 'root', getattr(self.source, 'path', ''))}', "
            f"{self.num_images} images, {self.num_classes} classes, batch {self.batch_size} "
            f"x {self.order.world_size} ranks, epoch {self._epoch} batch {self._position}/{len(self)})"
        )


def build_image_loader(path, batch_size: int, *, resolution: int = 256, rank: int = 0,
                       world_size: int = 1, seed: int = 0,
                       device: Optional[torch.device] = torch.device("cpu"), loader: str = "auto",
                       num_workers: int = 2, shuffle: bool = True, drop_last: bool = True,
                       hflip: bool = False, return_indices: bool = False):
    """An image loader for ``path`` (raw folder, official images.h5, or prepared shards).

    ``loader``: ``"dali"``, ``"torch"``, or ``"auto"`` (DALI when it is installed and
    ``device`` is CUDA, else torch). See the module docstring for the output contract.
    """
    if loader not in ("auto", "dali", "torch"):
        raise ValueError(f"loader must be 'auto', 'dali' or 'torch', got {loader!r}")
    for name, value in (("batch_size", batch_size), ("world_size", world_size), ("resolution", resolution)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be an int >= 1, got {value!r}")
    if not isinstance(rank, int) or not 0 <= rank < world_size:
        raise ValueError(f"rank must be an int in [0, {world_size}), got {rank!r}")
    if not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed must be an int >= 0, got {seed!r}")
    if not isinstance(num_workers, int) or num_workers < 0:
        raise ValueError(f"num_workers must be an int >= 0, got {num_workers!r}")
    device = torch.device("cpu" if device is None else device)

    source = open_source(path, resolution)  # DatasetError for missing/empty/wrong resolution
    order = SampleOrder(source.num_images, batch_size, rank, world_size, seed, shuffle, drop_last)
    if order.num_batches == 0:
        raise DatasetError(
            f"dataset '{os.fspath(path)}' has {source.num_images} images: not one full batch of "
            f"{batch_size} x {world_size} ranks (drop_last={drop_last})"
        )
    if loader == "auto":
        loader = "dali" if device.type == "cuda" and dali_available() else "torch"
    common = dict(resolution=resolution, device=device, hflip=hflip, return_indices=return_indices)
    if loader == "dali":
        from .loader_dali import DaliImageLoader  # noqa: PLC0415 (optional dependency)

        return DaliImageLoader(source, order, num_threads=max(1, num_workers), **common)
    from .loader_torch import TorchImageLoader  # noqa: PLC0415

    return TorchImageLoader(source, order, num_workers=num_workers, **common)
