"""The latent cache the official ``cache_latents.py`` writes, read as it is, so an existing
ImageNet cache need not be encoded again
(docs/workflows.md#repa_e_fastcache_latents-and-ldm-only-training):

    <data_dir>/images.h5 (+ images_h5.json)   the official preprocessed images (PNG bytes)
    <data_dir>/<name>.h5 (+ <name>_h5.json)    float32 [2C, h, w] = concat(mean, std) per image,
                                               keys ``.../img-mean-std-<8 digits>.npy``, and
                                               ``dataset.json`` with the labels

Images and latents are paired by position in their sorted key lists and the labels are those
of the latent keys, as the official dataset does. ``OfficialLatentLoader`` has the interface
of ``CachedLatentLoader`` (batches of (moments, uint8 images, labels), epochs, exact resume):
a seeded permutation per epoch, each rank taking every ``world_size``-th slice of it.
"""

import io
import json
import os

import numpy as np
import torch
from PIL import Image

from .sources import DatasetError, H5Source, _h5_bytes, _import_h5py, h5_member_names


class OfficialLatentLoader:
    def __init__(self, latents_h5: str, batch_size: int, *, rank: int = 0, world_size: int = 1, seed: int = 0,
                 device: torch.device = torch.device("cpu"), shuffle: bool = True, drop_last: bool = True):
        h5py = _import_h5py()
        data_dir = os.path.dirname(os.path.abspath(latents_h5))
        images_h5 = os.path.join(data_dir, "images.h5")
        for path in (latents_h5, images_h5):
            if not os.path.isfile(path):
                raise DatasetError(f"official latent cache: {path} is missing (written by the official "
                                   "preprocessing.py / cache_latents.py)")
        self.path = latents_h5
        self.images = H5Source(images_h5)
        with h5py.File(latents_h5, "r") as h5:
            names = h5_member_names(h5, latents_h5)
            if "dataset.json" not in h5:
                raise DatasetError(f"{latents_h5}: no 'dataset.json' labels inside")
            entries = json.loads(_h5_bytes(h5["dataset.json"][()]).decode("utf-8"))["labels"]
            keys = sorted(n for n in names if n.endswith(".npy"))
            if not keys:
                raise DatasetError(f"{latents_h5} holds no latents (.npy datasets)")
            self.moments_shape = tuple(h5[keys[0]].shape)
        label_of = {str(key).replace("\\", "/"): int(cls) for key, cls in entries}
        missing = [k for k in keys if k not in label_of]
        if missing:
            raise DatasetError(f"{latents_h5}: {len(missing)} latent(s) have no label, e.g. {missing[0]}")
        if len(keys) != self.images.num_images:
            raise DatasetError(f"{latents_h5} holds {len(keys)} latents but {images_h5} {self.images.num_images} "
                               "images: they are paired by position")
        self._keys = keys
        self.labels = torch.tensor([label_of[k] for k in keys], dtype=torch.int64)
        self.num_images = len(keys)
        self.num_classes = int(self.labels.max()) + 1
        self.stats = {"bad_images": 0}
        self.batch_size, self.rank, self.world_size, self.seed = batch_size, rank, world_size, seed
        self.device, self.shuffle, self.drop_last = device, shuffle, drop_last
        self._epoch, self._position = 0, 0
        self._h5, self._pid = None, None

    def __len__(self) -> int:
        per_step = self.batch_size * self.world_size
        return self.num_images // per_step if self.drop_last else -(-self.num_images // per_step)

    @property
    def epoch(self) -> int:
        return self._epoch

    def _order(self) -> torch.Tensor:
        if not self.shuffle:
            return torch.arange(self.num_images)
        return torch.randperm(self.num_images, generator=torch.Generator().manual_seed(self.seed + self._epoch))

    def batch_indices(self, order: torch.Tensor, batch: int) -> torch.Tensor:
        start = (batch * self.world_size + self.rank) * self.batch_size
        return order[start:start + self.batch_size]

    def _read_moments(self, index: int) -> np.ndarray:
        if self._h5 is None or self._pid != os.getpid():
            self._h5 = _import_h5py().File(self.path, "r")
            self._pid = os.getpid()
        moments = np.asarray(self._h5[self._keys[index]][()], dtype=np.float32)
        if moments.shape != self.moments_shape:
            raise DatasetError(f"{self.path}:{self._keys[index]} has shape {moments.shape}, "
                               f"expected {self.moments_shape}")
        return moments

    def _read_image(self, index: int) -> np.ndarray:
        with Image.open(io.BytesIO(self.images.read(index))) as image:
            return np.asarray(image.convert("RGB")).transpose(2, 0, 1)

    def __iter__(self):
        order = self._order()
        while self._position < len(self):
            indices = self.batch_indices(order, self._position).tolist()
            moments = torch.from_numpy(np.stack([self._read_moments(i) for i in indices]))
            images = torch.from_numpy(np.stack([self._read_image(i) for i in indices]))
            labels = self.labels[indices]
            self._position += 1
            yield moments.to(self.device), images.to(self.device), labels.to(self.device)
        self._epoch += 1
        self._position = 0

    def state_dict(self) -> dict:
        return {"epoch": self._epoch, "position": self._position}

    def load_state_dict(self, state: dict) -> None:
        self._epoch, self._position = int(state["epoch"]), int(state["position"])
