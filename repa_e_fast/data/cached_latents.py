"""Cached VAE latents for LDM-only training (spec §9.1-9.2), in the record store.

``cache_latents`` writes a directory with two record files in dataset order:

    latents.rec   float32 [2C, h, w] per image: concat(mean, std) of the posterior (the
                  official cache stores the standard deviation, not the log-variance),
                  with the int64 class labels
    images.rec    uint8 [3, H, W]: the centre-cropped images, for the REPA encoder targets
    meta.json     VAE layout and checkpoint, resolution, count

``CachedLatentLoader`` reads both with the same seed, batch and sharding, so the two readers
draw the same permutation and every batch pairs each image with its own latent.
"""

import json
from pathlib import Path

import torch

from .records import RecordReader

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
        self.meta = json.loads((directory / META_FILE).read_text())
        common = dict(batch_size=batch_size, rank=rank, world_size=world_size, seed=seed, shuffle=shuffle,
                      drop_last=drop_last, as_torch=True)
        self.latents = RecordReader(directory / LATENTS_FILE, **common)
        self.images = RecordReader(directory / IMAGES_FILE, **common)
        if self.latents.num_records != self.images.num_records:
            raise ValueError(f"cached latents at {directory}: {self.latents.num_records} latents but "
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
        for (moments, labels), (images, _) in zip(self.latents, self.images):
            yield (moments.to(self.device, non_blocking=True), images.to(self.device, non_blocking=True),
                   labels.to(self.device, non_blocking=True))

    def state_dict(self) -> dict:
        return {"latents": self.latents.state_dict(), "images": self.images.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.latents.load_state_dict(state["latents"])
        self.images.load_state_dict(state["images"])
