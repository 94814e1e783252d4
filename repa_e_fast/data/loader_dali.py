"""DALI loader: image decoding and the ADM crop on the GPU (or on DALI's CPU backend).

Order. DALI does not choose samples: an ``external_source`` callback (``_Feeder``) hands
the pipeline, batch by batch, the encoded bytes of exactly the images our
``SampleOrder`` picks, so the order, the rank sharding and the bad-image replacements are
those of the PyTorch loader. The feeder runs ahead of the consumer (DALI prefetch) and
continues across epoch boundaries; it records what it fed in a queue, from which labels,
indices and bad-data events are taken when the matching output comes out. Resuming, or
any cursor change, rebuilds the pipeline and restarts the feeder at the cursor.

Screening (CPU, in a thread pool). Each image's header is parsed with PIL. Only
complete 8-bit RGB JPEGs and PNGs go to DALI's decoder as they are; anything else
(grayscale, CMYK, palette, alpha, 16-bit, other formats, or a JPEG/PNG without its end
marker) is decoded and converted by PIL exactly as the PyTorch loader does, and handed to
DALI re-encoded as an uncompressed PNG. Unreadable images are replaced by the next good
image of the permutation. If DALI still fails on a batch, that batch is decoded on the
CPU instead (``stats["cpu_fallback_batches"]``) and the pipeline is rebuilt.

ADM crop on the GPU (raw folders only; h5 / prepared images are already cropped). PIL does
(docs/data.md#the-adm-centre-crop): BOX halvings while the short side >= 2R, then a
BICUBIC resize, then a centre crop; PIL resamples separably, horizontal pass first,
rounding to uint8 after each pass. The pipeline reproduces that pass by pass with
per-sample sizes computed on the CPU (``adm_geometry``): a BOX halving of an even side is
exactly a linear resize without antialiasing at scale 2 (the average of two pixels),
computed in float and rounded half up like PIL (odd sides: see ``_halving_pieces``); the
bicubic step is two antialiased cubic resizes (x then y) whose input ROI is the crop
window, so the crop costs nothing. Halving stages are per-sample conditionals
(``enable_conditionals``): an image runs only the halvings it needs, and the graph gets
more stages when an image needs more. Measured against PIL on the CPU backend the mean
absolute difference is ~0.004 grey levels (tests/test_data_dali.py,
benchmarks/bench_data.py). Residuals: PIL's fixed-point weights (a few pixels off by 1),
odd sides (one line per halving), and recent Pillow releases that run the vertical pass
first for some tall images (classic Pillow, and this graph, always go horizontal first):
~25% of those images' pixels differ by 1.
"""

from __future__ import annotations

import collections
import concurrent.futures
import io
import weakref
from typing import NamedTuple, Optional

import numpy as np
import torch
from PIL import Image

from .crop import BadImage, adm_center_crop, adm_geometry, check_image_size, decode_rgb
from .decode import Event, decode_batch
from .loader import ImageLoaderBase
from .order import MAX_CONSECUTIVE_BAD
from .sources import DatasetError

try:
    import nvidia.dali.fn as fn
    import nvidia.dali.math as dmath
    import nvidia.dali.types as types
    from nvidia.dali import pipeline_def
except ImportError:
    raise ImportError(
        "the DALI loader needs NVIDIA DALI: pip install nvidia-dali-cuda120 "
        "(or use loader='torch')"
    ) from None

__all__ = ["DaliImageLoader"]

# BOX-halving stages in a new graph. An image that needs more makes the loader rebuild
# its pipeline with enough stages (once per new maximum; ImageNet at 256 px ends at 1-3
# within the first batches), so every image gets PIL's sequence of halvings, and images
# that need fewer pass the extra stages as identities.
INITIAL_HALVING_STAGES = 0


class _NeedMoreHalvings(Exception):
    def __init__(self, stages: int):
        super().__init__(f"an image needs {stages} halving stages")
        self.stages = stages


class _Sample(NamedTuple):
    encoded: np.ndarray  # uint8 bytes for DALI's decoder
    size: tuple  # (width, height) of the decoded image
    index: int
    events: list


class _Fed(NamedTuple):
    """What the feeder put into the pipeline for one batch."""

    epoch: int
    batch: int
    labels: np.ndarray
    indices: np.ndarray
    events: list


def _jpeg_complete(data: bytes) -> bool:
    # A complete JPEG ends with the EOI marker (0xFFD9), possibly followed by a little
    # padding; 0xFFD9 cannot occur inside entropy-coded data (0xFF is byte-stuffed).
    end = data.rfind(b"\xff\xd9")
    return end >= 0 and end >= len(data) - 1024 and end > data.find(b"\xff\xda")


def _png_plain_rgb(data: bytes, image: Image.Image) -> bool:
    # 8-bit RGB (IHDR bit depth at byte 24, colour type 2 at byte 25), no tRNS, ends in IEND.
    return (len(data) > 33 and data[24] == 8 and data[25] == 2
            and "transparency" not in image.info and data[-12:-8] == b"\x00\x00\x00\x00"
            and data[-8:-4] == b"IEND")


def _png_bytes(image: Image.Image) -> np.ndarray:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", compress_level=0)  # fast to write and to decode
    return np.frombuffer(buffer.getvalue(), dtype=np.uint8)


def _round_to_uint8(x):
    """float -> uint8 rounding half up with clamping, as PIL's 8-bit resampling does."""
    return fn.cast(dmath.clamp(dmath.floor(x + 0.5), 0.0, 255.0), dtype=types.UINT8)


def _halving_pieces(n: int, halve: bool) -> tuple:
    """A PIL BOX halving (``n -> n // 2``) along one axis as two linear resizes.

    Returns two ``(output length, ROI start, ROI end)``. For even ``n`` the result is
    exact (pairs averaged). For odd ``n`` PIL averages pairs up to the middle of the
    axis, one triple there, then pairs again one pixel further on; we skip that middle
    pixel instead, so exactly one output line differs (it averages two pixels, not
    three). ``halve=False``: placeholder arguments (an identity) for an image that skips
    the stage.
    """
    if not halve:
        return (n - 1, 0, n - 1), (1, n - 1, n)
    m = n // 2
    split = 2 * ((m + 1) // 2)
    return (split // 2, 0, split), (m - split // 2, split + n % 2, n)


def _adm_arguments(width: int, height: int, res: int, stages: int) -> list:
    """Per-sample sizes and ROIs (float32 [2] arrays, (y, x) order) for the crop graph.

    Order: for each halving stage, the x pass then the y pass, each as two pieces of
    (size, roi_start, roi_end); then the cubic x pass (size, roi_start, roi_end) and the
    cubic y pass (roi_start, roi_end).
    """
    geometry = adm_geometry(width, height, res)
    if len(geometry.halvings) > stages:
        raise _NeedMoreHalvings(len(geometry.halvings))
    w, h = width, height
    args = []
    for k in range(stages):
        halve = k < len(geometry.halvings)
        for length, start, end in _halving_pieces(w, halve):  # x pass, height unchanged
            args += [np.array([h, length], np.float32), np.array([0, start], np.float32),
                     np.array([h, end], np.float32)]
        w = w // 2 if halve else w
        for length, start, end in _halving_pieces(h, halve):  # y pass
            args += [np.array([length, w], np.float32), np.array([start, 0], np.float32),
                     np.array([end, w], np.float32)]
        h = h // 2 if halve else h
    # Cubic resize of the halved w x h image to the scaled size, cropped: only the
    # input ROI that maps onto the crop window is resampled.
    sx, sy = w / geometry.scaled[0], h / geometry.scaled[1]
    left, top = geometry.left, geometry.top
    args += [np.array([h, res], np.float32), np.array([0, left * sx], np.float32),
             np.array([h, (left + res) * sx], np.float32)]
    args += [np.array([top * sy, 0], np.float32), np.array([(top + res) * sy, res], np.float32)]
    # Per stage: does this image take it? (DALI conditionals skip the stage otherwise.)
    args += [np.array(k < len(geometry.halvings)) for k in range(stages)]
    return args


def _adm_argument_count(stages: int) -> int:
    return stages * 2 * 6 + 5 + stages


def _halving_pass(images, args, axis: int):
    """Two linear resizes (float) concatenated along ``axis`` and rounded like PIL."""
    linear = types.DALIInterpType.INTERP_LINEAR
    pieces = [
        fn.resize(images, size=args[3 * p], roi_start=args[3 * p + 1], roi_end=args[3 * p + 2],
                  interp_type=linear, antialias=False, dtype=types.FLOAT)
        for p in (0, 1)
    ]
    return _round_to_uint8(fn.cat(*pieces, axis=axis))


class _Feeder:
    """DALI's external source: the inputs of one batch per call, from a cursor onward."""

    def __init__(self, loader: "DaliImageLoader", epoch: int, batch: int):
        self._loader = weakref.ref(loader)  # no loader <-> pipeline cycle: freed promptly
        self.next = (epoch, batch)
        self.fed: collections.deque = collections.deque()
        self.error: Optional[Exception] = None

    def head(self) -> tuple:
        """(epoch, batch) of the next output the pipeline will return."""
        return (self.fed[0].epoch, self.fed[0].batch) if self.fed else self.next

    def __call__(self):
        loader = self._loader()
        epoch, batch = self.next
        try:
            samples, fed = loader._screen_batch(epoch, batch)
            inputs = loader._pipeline_inputs(fed, samples)
        except (DatasetError, _NeedMoreHalvings) as exc:  # DALI wraps callback errors
            self.error = exc
            raise
        self.fed.append(fed)
        self.next = (epoch, batch + 1) if batch + 1 < loader.order.num_batches else (epoch + 1, 0)
        return inputs


class DaliImageLoader(ImageLoaderBase):
    kind = "dali"

    def __init__(self, source, order, *, num_threads: int = 2, resolution: int, device,
                 hflip: bool, return_indices: bool, prefetch: int = 2):
        super().__init__(source, order, resolution=resolution, device=device, hflip=hflip,
                         return_indices=return_indices)
        if self.device.type not in ("cpu", "cuda"):
            raise ValueError(f"the DALI loader runs on cpu or cuda, not {self.device}")
        self.num_threads = int(num_threads)
        self.prefetch = int(prefetch)
        self.crop_on_device = not source.cropped
        self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=self.num_threads)
        self._pipe = None
        self._feeder: Optional[_Feeder] = None
        self._halving_stages = INITIAL_HALVING_STAGES

    # ---------------------------------------------------------------- screening (CPU)

    def _screen(self, index: int) -> _Sample:
        """Read one image and make sure DALI gets something it decodes like PIL would."""
        source, res = self.source, self.resolution
        try:
            data = source.read(index)
        except OSError as exc:
            raise BadImage(f"cannot read ({type(exc).__name__}: {exc})") from None
        try:
            header = Image.open(io.BytesIO(data))
            size, mode, fmt = header.size, header.mode, header.format
        except Exception as exc:
            raise BadImage(f"cannot decode ({type(exc).__name__}: {exc})") from None
        check_image_size(size)
        events = []
        direct = mode == "RGB" and (
            (fmt == "JPEG" and _jpeg_complete(data)) or (fmt == "PNG" and _png_plain_rgb(data, header))
        )
        if direct and (self.crop_on_device or size == (res, res)):
            encoded = np.frombuffer(data, dtype=np.uint8)
        else:
            image, note = decode_rgb(data)  # BadImage for truncated / corrupt data
            if note is not None:
                events.append(Event("converted", index, source.name(index), note))
            if not self.crop_on_device and image.size != (res, res):
                # A pre-cropped dataset with an image of another size: crop it here.
                image = adm_center_crop(image, res)
            size = image.size
            encoded = _png_bytes(image)
        if min(size) < res:
            events.append(Event("small", index, source.name(index), f"{size[0]}x{size[1]} upscaled to {res}"))
        return _Sample(encoded, size, index, events)

    def _try_screen(self, index: int):
        try:
            return self._screen(index)
        except BadImage as exc:
            return exc

    def _screen_batch(self, epoch: int, batch: int):
        """Screen one batch's images (in parallel), replacing bad ones; (samples, _Fed)."""
        positions = self.order.batch_positions(batch)
        first_try = list(self._pool.map(self._try_screen, self.order.permutation(epoch)[positions].tolist()))
        samples, events = [], []
        for position, result in zip(positions.tolist(), first_try):
            candidates = self.order.candidates(epoch, position)
            index = next(candidates)  # the slot's own image, screened above
            while isinstance(result, BadImage):
                events.append(Event("bad", index, self.source.name(index), str(result)))
                index = next(candidates, None)
                if index is None:
                    raise DatasetError(
                        f"more than {MAX_CONSECUTIVE_BAD} consecutive images in a row cannot be "
                        f"read (around {self.source.name(int(self.order.permutation(epoch)[position]))}); "
                        f"the dataset is broken"
                    )
                result = self._try_screen(index)
            events.extend(result.events)
            samples.append(result)
        used = np.array([s.index for s in samples], dtype=np.int64)
        return samples, _Fed(epoch, batch, self.source.labels[used], used, events)

    # ---------------------------------------------------------------- pipeline inputs

    def _pipeline_inputs(self, fed: _Fed, samples: list):
        res = self.resolution
        encoded = [s.encoded for s in samples]
        if self.hflip:
            positions = self.order.batch_positions(fed.batch)
            flips = self.order.flips(fed.epoch)[positions].astype(np.int32)
        else:
            flips = np.zeros(len(samples), dtype=np.int32)
        outputs = [encoded, [np.int32(f) for f in flips]]
        if not self.crop_on_device:
            return tuple(outputs)
        per_sample = [_adm_arguments(s.size[0], s.size[1], res, self._halving_stages) for s in samples]
        # Transpose to one list per pipeline input.
        outputs += [[args[i] for args in per_sample] for i in range(len(per_sample[0]))]
        return tuple(outputs)

    # ---------------------------------------------------------------- pipeline

    def _build(self, epoch: int, batch: int) -> None:
        self._pipe = None  # release the old pipeline (and its prefetched batches) first
        self._feeder = _Feeder(self, epoch, batch)
        on_gpu = self.device.type == "cuda"
        res = self.resolution
        stages = self._halving_stages
        num_inputs = 2 + (_adm_argument_count(stages) if self.crop_on_device else 0)
        feeder = self._feeder
        crop = self.crop_on_device

        @pipeline_def(batch_size=self.order.batch_size, num_threads=self.num_threads,
                      device_id=self._cuda_index() if on_gpu else None,
                      prefetch_queue_depth=self.prefetch, exec_dynamic=True,
                      enable_conditionals=True)
        def graph():
            inputs = fn.external_source(source=feeder, num_outputs=num_inputs, batch=True)
            encoded, flips = inputs[0], inputs[1]
            images = fn.decoders.image(
                encoded, device="mixed" if on_gpu else "cpu", output_type=types.RGB,
                adjust_orientation=False,  # PIL (the official preprocessing) ignores EXIF
            )
            if crop:
                args = inputs[2:]
                takes_stage = args[12 * stages + 5 :]
                for k in range(stages):
                    # Per-sample branch: only the images that need this halving run it.
                    if takes_stage[k]:
                        images = _halving_pass(images, args[12 * k : 12 * k + 6], axis=1)  # HWC: x
                        images = _halving_pass(images, args[12 * k + 6 : 12 * k + 12], axis=0)  # y
                x_size, x_start, x_end, y_start, y_end = args[12 * stages : 12 * stages + 5]
                cubic = types.DALIInterpType.INTERP_CUBIC
                images = _round_to_uint8(fn.resize(
                    images, size=x_size, roi_start=x_start, roi_end=x_end, interp_type=cubic,
                    antialias=True, dtype=types.FLOAT))
                images = _round_to_uint8(fn.resize(
                    images, size=[res, res], roi_start=y_start, roi_end=y_end, interp_type=cubic,
                    antialias=True, dtype=types.FLOAT))
            images = fn.flip(images, horizontal=flips)
            return fn.transpose(images, perm=[2, 0, 1])

        self._pipe = graph()
        self._pipe.build()

    def _cuda_index(self) -> int:
        return self.device.index if self.device.index is not None else torch.cuda.current_device()

    def _to_torch(self, output) -> torch.Tensor:
        tensor = output.as_tensor()
        if self.device.type == "cuda":
            from nvidia.dali.plugin.pytorch import feed_ndarray  # noqa: PLC0415

            images = torch.empty(tensor.shape(), dtype=torch.uint8, device=self.device)
            feed_ndarray(tensor, images, cuda_stream=torch.cuda.current_stream(self.device))
            return images
        return torch.from_numpy(np.array(tensor))  # copy: DALI reuses its buffers

    def _batches(self, start: int):
        epoch, batch = self.epoch, start
        while batch < self.order.num_batches:
            if self._pipe is None or self._feeder.head() != (epoch, batch):
                self._build(epoch, batch)
            try:
                (output,) = self._pipe.run()
                fed = self._feeder.fed.popleft()
                images = self._to_torch(output)
            except Exception:
                error = self._feeder.error
                self._pipe = None
                if isinstance(error, _NeedMoreHalvings):
                    # A larger image than any before: rebuild with more stages and redo
                    # the batches the old pipeline had in flight.
                    self._halving_stages = error.stages
                    continue
                if error is not None:
                    raise error from None
                # DALI could not decode something the screening let through: do this
                # batch on the CPU and restart the pipeline after it.
                self._fallback_batches += 1
                array, labels, indices, events = decode_batch(
                    self.source, self.order, epoch, batch, self.resolution, self.hflip)
                images = torch.from_numpy(array)
                fed = _Fed(epoch, batch, labels, indices, events)
            labels = torch.from_numpy(np.ascontiguousarray(fed.labels))
            indices = torch.from_numpy(np.ascontiguousarray(fed.indices))
            if self.device.type == "cuda":
                images = images.to(self.device, non_blocking=True)
                labels = labels.to(self.device, non_blocking=True)
                indices = indices.to(self.device, non_blocking=True)
            yield images, labels, indices, fed.events
            batch += 1

    def close(self) -> None:
        self._pipe = None
        self._feeder = None
        self._pool.shutdown(wait=False)
