"""PyTorch fallback loader: PIL decoding and the ADM crop in DataLoader worker processes.

One DataLoader item is one whole batch, addressed by ``(epoch, batch)``: the worker
computes the batch's indices from the shared ``SampleOrder``, so it can also pick the
deterministic replacement for a bad image (the next good image of the permutation)
without asking the main process. Workers are persistent across epochs.
"""

from __future__ import annotations

import signal
import weakref

import torch
import torch.utils.data

from .decode import decode_batch
from .loader import ImageLoaderBase

__all__ = ["TorchImageLoader"]


def _ignore_stop_signals(worker_id: int) -> None:
    """Workers leave SIGTERM/SIGINT/SIGUSR1 to the main process. Slurm, ``timeout``, systemd
    and Ctrl-C signal the whole process group; a worker that died of it would make the main
    process raise instead of writing its preemption checkpoint. The workers still exit: the
    main process shuts them down, and they notice when it is gone."""
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1):
        signal.signal(sig, signal.SIG_IGN)


class _BatchDataset(torch.utils.data.Dataset):
    def __init__(self, source, order, resolution: int, hflip: bool):
        self.source = source
        self.order = order
        self.resolution = resolution
        self.hflip = hflip

    def __getitem__(self, key):
        epoch, batch = key
        images, labels, indices, events = decode_batch(
            self.source, self.order, epoch, batch, self.resolution, self.hflip
        )
        return (torch.from_numpy(images), torch.from_numpy(labels), torch.from_numpy(indices),
                [tuple(e) for e in events])


class _CursorSampler(torch.utils.data.Sampler):
    """Yields ``(epoch, batch)`` from the loader's cursor to the end of the epoch."""

    def __init__(self, loader: "TorchImageLoader"):
        # A weak reference: a loader <-> DataLoader cycle would leave the workers' shutdown
        # to the cyclic GC, which closes their queues first and then waits 5 s per worker.
        self._loader = weakref.ref(loader)

    def __iter__(self):
        loader = self._loader()
        epoch, start = loader.epoch, loader.position
        return iter([(epoch, batch) for batch in range(start, loader.order.num_batches)])

    def __len__(self):
        loader = self._loader()
        return loader.order.num_batches - loader.position


class TorchImageLoader(ImageLoaderBase):
    kind = "torch"

    def __init__(self, source, order, *, num_workers: int = 2, resolution: int, device,
                 hflip: bool, return_indices: bool):
        super().__init__(source, order, resolution=resolution, device=device, hflip=hflip,
                         return_indices=return_indices)
        self.num_workers = int(num_workers)
        self._pin = self.device.type == "cuda"
        self._dataloader = torch.utils.data.DataLoader(
            _BatchDataset(source, order, self.resolution, self.hflip),
            batch_size=None,  # items are already batches
            sampler=_CursorSampler(self),
            num_workers=self.num_workers,
            pin_memory=self._pin,
            persistent_workers=self.num_workers > 0,
            prefetch_factor=2 if self.num_workers > 0 else None,
            worker_init_fn=_ignore_stop_signals,
            # Its own generator: creating an iterator draws a worker seed, which must not
            # consume the global torch RNG that the training step draws t and noise from
            # (exact resume depends on it).
            generator=torch.Generator(),
        )

    def _batches(self, start: int):
        if self._dataloader is None:
            raise ValueError("the image loader is closed")
        for images, labels, indices, events in self._dataloader:
            if self.device.type != "cpu":
                images = images.to(self.device, non_blocking=True)
                labels = labels.to(self.device, non_blocking=True)
                indices = indices.to(self.device, non_blocking=True)
            yield images, labels, indices, events

    def close(self) -> None:
        # The last reference to the DataLoader: its iterator shuts the workers down.
        self._dataloader = None
