"""Which samples go into which batch: the one sample order of every loader and the record reader.

Per epoch, one permutation of all dataset indices, a function of ``(seed, epoch)`` only, so it
is identical on every rank and in every run (``epoch_permutation``; the C++ extension computes
the same one, ``csrc/shuffle.h``)::

    mix64(z)    = splitmix64 finaliser (z ^= z>>30; z *= 0xBF58476D1CE4E5B9;
                  z ^= z>>27; z *= 0x94D049BB133111EB; z ^= z>>31; all mod 2**64)
    s           = mix64(mix64(seed) ^ epoch)
    key[i]      = mix64(s + (i + 1) * 0x9E3779B97F4A7C15)
    permutation = argsort(key)   (keys are all distinct, so the order is unique)

``shuffle=False`` uses the identity. With ``B`` the per-rank batch and ``W`` the world size,
global batch ``k`` is ``perm[k*B*W : (k+1)*B*W]`` and rank ``r`` gets the slice
``[r*B : (r+1)*B]`` of it, so a 1-rank loader with batch ``2b`` yields ``concat(rank 0,
rank 1)`` of a 2-rank loader with batch ``b``. ``drop_last=True`` drops the incomplete last
global batch; with ``drop_last=False`` its ``R`` samples are split as ``ceil(R/W)`` per rank,
wrapping to the start of the permutation (fewer than ``W`` repeats) so that every rank runs
the same number of batches, as DDP needs.

Bad images: the sample at permutation position ``p`` that cannot be decoded is replaced
by the first good image at positions ``p+1, p+2, ...`` (mod N) of the same epoch's
permutation. This is deterministic (same replacement in every run, on every loader) and
keeps batch shapes fixed.
"""

from __future__ import annotations

import numpy as np

from .native_extension import require_native

__all__ = ["SampleOrder", "OrderCursor", "epoch_permutation", "MAX_CONSECUTIVE_BAD", "IMPLEMENTATIONS"]

# A run of this many unreadable images in a row means the dataset itself is broken.
MAX_CONSECUTIVE_BAD = 1000


# How the permutation is computed: identical results, "native" is the C++ extension.
IMPLEMENTATIONS = ("python", "native")

_MASK64 = (1 << 64) - 1
_GOLDEN = 0x9E3779B97F4A7C15


def _mix64_int(z: int) -> int:
    z &= _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return z ^ (z >> 31)


def _mix64_np(z: np.ndarray) -> np.ndarray:
    # uint64 array arithmetic wraps modulo 2**64, which is what splitmix64 wants.
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def epoch_permutation(n: int, seed: int, epoch: int, implementation: str = "python") -> np.ndarray:
    """The permutation of range(n) for (seed, epoch), as int64 (see the module docstring)."""
    if n < 0 or not (0 <= seed <= _MASK64) or not (0 <= epoch <= _MASK64):
        raise ValueError(f"epoch_permutation: bad arguments n={n} seed={seed} epoch={epoch}")
    if implementation == "native":
        return require_native("epoch_permutation").permutation(int(n), int(seed), int(epoch))
    if implementation != "python":
        raise ValueError(f"epoch_permutation: implementation must be one of {IMPLEMENTATIONS}, "
                         f"got {implementation!r}")
    s = _mix64_int(_mix64_int(seed) ^ epoch)
    i = np.arange(1, n + 1, dtype=np.uint64)
    keys = _mix64_np(np.uint64(s) + i * np.uint64(_GOLDEN))
    return np.argsort(keys, kind="stable").astype(np.int64, copy=False)


class SampleOrder:
    def __init__(self, num_images: int, batch_size: int, rank: int, world_size: int,
                 seed: int, shuffle: bool, drop_last: bool, implementation: str = "python"):
        self.num_images = int(num_images)
        self.batch_size = int(batch_size)
        self.rank = int(rank)
        self.world_size = int(world_size)
        self.seed = int(seed)
        self.shuffle = bool(shuffle)
        self.drop_last = bool(drop_last)
        self.implementation = implementation  # of epoch_permutation
        global_batch = self.batch_size * self.world_size
        self.full_batches = self.num_images // global_batch
        self.tail = self.num_images - self.full_batches * global_batch
        self.num_batches = self.full_batches + (1 if self.tail and not self.drop_last else 0)
        self._cached_epoch = None
        self._perm = None
        self._flips = None

    def permutation(self, epoch: int) -> np.ndarray:
        self._ensure(epoch)
        return self._perm

    def flips(self, epoch: int) -> np.ndarray:
        """uint8 [N]: whether the sample at each permutation position is flipped."""
        self._ensure(epoch)
        if self._flips is None:
            rng = np.random.default_rng([self.seed, epoch, 0x666C6970])  # "flip"
            self._flips = rng.integers(0, 2, self.num_images, dtype=np.uint8)
        return self._flips

    def _ensure(self, epoch: int) -> None:
        if self._cached_epoch != epoch:
            if self.shuffle:
                self._perm = epoch_permutation(self.num_images, self.seed, epoch, self.implementation)
            else:
                self._perm = np.arange(self.num_images, dtype=np.int64)
            self._flips = None
            self._cached_epoch = epoch

    def settings(self) -> dict:
        """What defines the order, as saved in a loader's or reader's state_dict."""
        return {"seed": self.seed, "shuffle": self.shuffle, "drop_last": self.drop_last,
                "batch_size": self.batch_size, "world_size": self.world_size, "rank": self.rank}

    def batch_positions(self, batch: int) -> np.ndarray:
        """Permutation positions of this rank's batch ``batch`` (int64)."""
        if not 0 <= batch < self.num_batches:
            raise IndexError(f"batch {batch} not in [0, {self.num_batches})")
        B, W, r = self.batch_size, self.world_size, self.rank
        if batch < self.full_batches:
            start = batch * B * W + r * B
            return np.arange(start, start + B, dtype=np.int64)
        k = -(-self.tail // W)  # ceil(R / W) per rank
        start = self.full_batches * B * W + r * k
        return np.arange(start, start + k, dtype=np.int64) % self.num_images

    def batch_indices(self, epoch: int, batch: int) -> np.ndarray:
        return self.permutation(epoch)[self.batch_positions(batch)]

    def candidates(self, epoch: int, position: int):
        """Dataset indices to try for the slot at ``position``: itself, then replacements."""
        perm = self.permutation(epoch)
        for step in range(min(MAX_CONSECUTIVE_BAD, self.num_images)):
            yield int(perm[(position + step) % self.num_images])


class OrderCursor:
    """A place in a ``SampleOrder``: the epoch, and how many of its batches were handed out.

    The base of the image loaders and the record reader, which set ``order``, ``_epoch``
    and ``_position``; the same cursor means the same next batch on all of them.
    """

    order: SampleOrder
    _epoch: int
    _position: int

    @property
    def batch_size(self) -> int:
        return self.order.batch_size

    def __len__(self) -> int:
        """Batches per epoch for this rank."""
        return self.order.num_batches

    @property
    def epoch(self) -> int:
        return self._epoch

    @property
    def position(self) -> int:
        """Batches of the current epoch already handed out."""
        return self._position
