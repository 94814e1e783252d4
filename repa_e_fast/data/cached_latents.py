"""Cached VAE latents for LDM-only training, in the record store
(docs/workflows.md#repa_e_fastcache_latents-and-ldm-only-training).

``cache_latents`` writes a directory with two record files in dataset order:

    latents.rec   float32 [2C, h, w] per image: concat(mean, std) of the posterior (the
                  official cache stores the standard deviation, not the log-variance),
                  with the int64 class labels
    images.rec    uint8 [3, H, W]: the centre-cropped images, for the REPA encoder targets
    meta.json     VAE layout and checkpoint, resolution, count

``CachedLatentLoader`` reads both with the same seed, batch and sharding, so the two readers
draw the same permutation and every batch pairs each image with its own latent.

Integrity: a truncated or damaged file is refused at open (``DatasetError``, one line). Each
record file comes with per-record CRC-32s (``<file>.crc.npz``, see ``record_format.py``). Every
batch of latents and labels is checked against them as it is read, so a flipped bit is
reported by file and record the first time it is used, instead of surfacing as a
non-finite loss; that costs about what reading the batch does (~0.5 ms per 32 f8d4 latents
on one CPU core). ``images.rec`` (the encoder's targets) is 6x larger per record and a flipped
bit there changes one pixel, so its batches are not hashed in the training loop (its sidecar
is checked to belong to the file at open; ``RecordReader.check_records`` checks records on
demand). A cache written before the sidecars existed has ``latents.rec`` verified once at
open instead (one pass).
"""

import json
import logging
from pathlib import Path

import torch

from .record_reader import RecordReader
from .sources import DatasetError

logger = logging.getLogger("repa_e_fast.data")

LATENTS_FILE = "latents.rec"
IMAGES_FILE = "images.rec"
META_FILE = "meta.json"


class CachedLatentLoader:
    def __init__(self, directory, batch_size: int, *, rank: int = 0, world_size: int = 1, seed: int = 0,
                 device: torch.device = torch.device("cpu"), shuffle: bool = True, drop_last: bool = True):
        directory = Path(directory)
        for name in (LATENTS_FILE, IMAGES_FILE, META_FILE):
            if not (directory / name).is_file():
                raise FileNotFoundError(f"cached latents at {directory}: {name} is missing "
                                        "(write them with python -m repa_e_fast.cache_latents)")
        common = dict(batch_size=batch_size, rank=rank, world_size=world_size, seed=seed, shuffle=shuffle,
                      drop_last=drop_last, as_torch=True)
        try:
            self.meta = json.loads((directory / META_FILE).read_text())
            self.latents = RecordReader(directory / LATENTS_FILE, **common)
            self.images = RecordReader(directory / IMAGES_FILE, **common)
            if self.latents.record_crcs is None:
                logger.warning("cached latents at %s have no per-record checksums (written by an older "
                               "cache_latents): verifying %s in one pass", directory, LATENTS_FILE)
                self.latents.verify()
        except ValueError as error:  # record-file checks; JSON and decoding errors are ValueErrors too
            raise DatasetError(f"cached latents at {directory}: {error}") from None
        if self.latents.num_records != self.images.num_records:
            raise DatasetError(f"cached latents at {directory}: {self.latents.num_records} latents but "
                               f"{self.images.num_records} images")
        self.device = device
        self.num_images = self.latents.num_records
        self.num_classes = int(self.meta["num_classes"])
        self.stats = {"bad_images": int(self.meta.get("bad_images", 0))}

    def __len__(self) -> int:
        return len(self.latents)

    @property
    def epoch(self) -> int:
        return self.latents.epoch

    def __iter__(self):
        image_batches = iter(self.images)
        for moments, labels in self.latents:
            images, _ = next(image_batches)
            self._check(moments, labels)
            yield (moments.to(self.device, non_blocking=True), images.to(self.device, non_blocking=True),
                   labels.to(self.device, non_blocking=True))
        # Run the images reader to its end too, so that it starts the next epoch together with
        # the latents reader (zip() left it behind: an empty epoch, then images paired with the
        # latents of another batch).
        if next(image_batches, None) is not None:
            raise RuntimeError(f"{self.images.path} has more batches than {self.latents.path}")

    def _check(self, moments, labels) -> None:
        """The latents and labels of the batch just read against their CRC-32s."""
        if self.latents.record_crcs is None:
            return  # an older cache: verified as a whole at open
        try:
            indices = self.latents.order.batch_indices(self.latents.epoch, self.latents.position - 1)
            self.latents.check_records(indices, moments, labels)
        except ValueError as error:
            raise DatasetError(str(error)) from None

    def state_dict(self) -> dict:
        return {"latents": self.latents.state_dict(), "images": self.images.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.latents.load_state_dict(state["latents"])
        self.images.load_state_dict(state["images"])
