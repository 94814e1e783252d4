"""Prepare a raw image folder for training: ADM centre crop once, store compact shards.

    python -m repa_e_fast.data.prepare SRC DST --resolution 256 --workers 16 [--format png|jpeg]

SRC is an ImageNet-style folder (``SRC/<class>/*.JPEG``, or ``SRC/train/...``, or with a
``dataset.json``; same listing and class numbering as the loaders). Each image is
decoded, converted to RGB, ADM-centre-cropped (docs/data.md#the-adm-centre-crop) and
encoded as PNG (lossless, default) or JPEG (``--quality``, 4:4:4 chroma) into tar shards of
``--shard-size`` images. DST then holds::

    shard-000000.tar ...   the images, ``<8-digit source index>.png|.jpg`` + ``.cls``
                           (plain tar: ``tar tf`` lists it, webdataset can read it)
    shard-000000.json ...  per shard: byte offset, size, label, source path of each image,
                           and the files that were skipped
    index.npy              int64 [N, 4]: shard, byte offset, byte size, label per image
    meta.json              resolution, codec, counts, class names (written last: its
                           presence means the dataset is complete)
    bad_images.tsv         skipped files with the reason, one per line
    prepare.json           the settings, checked when a run is resumed

Resumable: a shard is published (temp file + rename) only when complete, so re-running
the same command skips finished shards and redoes at most the interrupted one. Images
that cannot be decoded are skipped and listed in ``bad_images.tsv``; grayscale, CMYK,
palette and alpha images are converted (alpha dropped), as the loaders do.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import multiprocessing
import os
import sys
import tarfile
import time
from typing import Optional

import numpy as np

from .crop import BadImage, adm_center_crop, decode_rgb
from .sources import PREPARED_FORMAT, DatasetError, FolderSource, read_regular_file

__all__ = ["prepare", "main"]

VERSION = 1
CODECS = {"png": ".png", "jpeg": ".jpg"}


def _write_atomic(path: str, data: bytes) -> None:
    tmp = f"{os.path.join(os.path.dirname(path), '.' + os.path.basename(path))}.tmp-{os.getpid()}"
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _encode(image, codec: str, quality: int) -> bytes:
    buffer = io.BytesIO()
    if codec == "png":
        # Level 6: ~15% smaller than level 1 and no slower to decode; encoding (slower) is
        # paid once here, in parallel.
        image.save(buffer, format="PNG", compress_level=6)
    else:
        image.save(buffer, format="JPEG", quality=quality, subsampling=0)  # 4:4:4, no chroma loss
    return buffer.getvalue()


def _process(task):
    """Worker: (source index, path, resolution, codec, quality) -> encoded crop or reason."""
    index, path, resolution, codec, quality = task
    try:
        data = read_regular_file(path)
        image, note = decode_rgb(data)
        encoded = _encode(adm_center_crop(image, resolution), codec, quality)
        return index, encoded, note, None
    except (OSError, BadImage) as exc:
        reason = str(exc) if isinstance(exc, BadImage) else f"cannot read ({type(exc).__name__}: {exc})"
        return index, None, None, reason


def _shard_name(shard: int) -> str:
    return f"shard-{shard:06d}"


def _write_shard(dst: str, shard: int, results: list, source: FolderSource, codec: str) -> None:
    """Publish one shard: the tar, then its sidecar JSON (the shard counts as done)."""
    name = _shard_name(shard)
    tar_path = os.path.join(dst, name + ".tar")
    tmp = os.path.join(dst, f".{name}.tar.tmp-{os.getpid()}")
    images, bad, converted = [], [], []
    with tarfile.open(tmp, "w", format=tarfile.USTAR_FORMAT) as tar:
        for index, encoded, note, reason in results:
            relpath = source.relpath(index)
            if encoded is None:
                bad.append([relpath, reason])
                continue
            if note is not None:
                converted.append([relpath, note])
            label = int(source.labels[index])
            for suffix, payload in ((CODECS[codec], encoded), (".cls", str(label).encode())):
                info = tarfile.TarInfo(f"{index:08d}{suffix}")
                info.size, info.mtime, info.mode = len(payload), 0, 0o644
                header_size = len(info.tobuf(tar.format, tar.encoding, tar.errors))
                offset = tar.offset + header_size
                tar.addfile(info, io.BytesIO(payload))
                if suffix != ".cls":
                    images.append([offset, len(payload), label, relpath])
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    os.replace(tmp, tar_path)
    sidecar = {"images": images, "bad": bad, "converted": converted}
    _write_atomic(os.path.join(dst, name + ".json"), json.dumps(sidecar).encode())


def _finish(dst: str, settings: dict, source: FolderSource, num_shards: int) -> dict:
    """All shards are done: write index.npy, the reports and meta.json (last)."""
    rows, bad, converted = [], [], []
    for shard in range(num_shards):
        with open(os.path.join(dst, _shard_name(shard) + ".json"), encoding="utf-8") as f:
            sidecar = json.load(f)
        rows += [[shard, offset, size, label] for offset, size, label, _ in sidecar["images"]]
        bad += sidecar["bad"]
        converted += sidecar["converted"]
    index = np.array(rows, dtype=np.int64).reshape(-1, 4)
    buffer = io.BytesIO()
    np.save(buffer, index)
    _write_atomic(os.path.join(dst, "index.npy"), buffer.getvalue())
    _write_atomic(os.path.join(dst, "bad_images.tsv"),
                  "".join(f"{rel}\t{reason}\n" for rel, reason in bad).encode())
    meta = {
        "format": PREPARED_FORMAT,
        "version": VERSION,
        "resolution": settings["resolution"],
        "codec": settings["codec"],
        "quality": settings["quality"] if settings["codec"] == "jpeg" else None,
        "num_images": len(index),
        "num_classes": source.num_classes,
        "class_names": source.class_names,
        "shards": [_shard_name(s) + ".tar" for s in range(num_shards)],
        "source": settings["source"],
        "bad_images": len(bad),
        "converted_images": len(converted),
    }
    _write_atomic(os.path.join(dst, "meta.json"), json.dumps(meta, indent=1).encode())
    return meta


def prepare(src, dst, *, resolution: int = 256, workers: int = 1, codec: str = "png",
            quality: int = 95, shard_size: int = 1000, max_shards: Optional[int] = None,
            progress: bool = True, max_images: Optional[int] = None) -> dict:
    """Prepare ``src`` into ``dst`` (see the module docstring); returns a summary dict.

    ``max_shards``: write at most this many shards in this call (re-run to continue).
    ``max_images``: only the first this many images of the source's order (official flag).
    """
    if max_images is not None and max_images < 1:
        raise ValueError(f"max_images must be >= 1, got {max_images}")
    if codec not in CODECS:
        raise ValueError(f"codec must be one of {sorted(CODECS)}, got {codec!r}")
    if resolution < 1 or shard_size < 1 or workers < 1 or not 1 <= quality <= 100:
        raise ValueError("resolution, shard_size and workers must be >= 1, quality in [1, 100]")
    if not os.path.isdir(src):
        raise DatasetError(f"source folder '{src}' does not exist")
    source = FolderSource(src)
    count = source.num_images if max_images is None else min(max_images, source.num_images)
    dst = os.path.abspath(dst)
    os.makedirs(dst, exist_ok=True)
    listing = hashlib.sha256()
    for index in range(count):
        listing.update(f"{source.relpath(index)}\t{int(source.labels[index])}\n".encode())
    settings = {
        "version": VERSION, "source": source.root, "resolution": resolution, "codec": codec,
        "quality": quality, "shard_size": shard_size, "num_sources": count,
        "listing_sha256": listing.hexdigest(),
    }
    settings_path = os.path.join(dst, "prepare.json")
    if os.path.isfile(settings_path):
        with open(settings_path, encoding="utf-8") as f:
            previous = json.load(f)
        changed = {k: (previous.get(k), v) for k, v in settings.items() if previous.get(k) != v}
        if changed:
            raise DatasetError(
                f"'{dst}' holds a prepare run with other settings or another source listing "
                f"({', '.join(f'{k}: {a!r} -> {b!r}' for k, (a, b) in changed.items())}); "
                f"use a new destination or delete it"
            )
    else:
        _write_atomic(settings_path, json.dumps(settings, indent=1).encode())
    for name in os.listdir(dst):  # leftovers of a killed run
        if name.startswith(".") and ".tmp-" in name:
            os.unlink(os.path.join(dst, name))

    num_shards = -(-count // shard_size)
    todo = [s for s in range(num_shards)
            if not os.path.isfile(os.path.join(dst, _shard_name(s) + ".json"))]
    skipped_shards = num_shards - len(todo)
    if max_shards is not None:
        todo = todo[:max_shards]
    tasks = [
        (index, source.name(index), resolution, codec, quality)
        for shard in todo
        for index in range(shard * shard_size, min((shard + 1) * shard_size, count))
    ]
    start = time.perf_counter()
    pool = multiprocessing.Pool(workers) if workers > 1 and tasks else None
    try:
        results = pool.imap(_process, tasks, chunksize=4) if pool else map(_process, tasks)
        from tqdm import tqdm  # noqa: PLC0415

        bar = tqdm(total=len(tasks), unit="img", desc="prepare", disable=not progress)
        pending: list = []
        shards = iter(todo)
        shard = next(shards, None)
        for result in results:
            pending.append(result)
            bar.update(1)
            end = min((shard + 1) * shard_size, count)
            if result[0] == end - 1:  # imap keeps task order: this shard is complete
                _write_shard(dst, shard, pending, source, codec)
                pending = []
                shard = next(shards, None)
        bar.close()
    finally:
        if pool is not None:
            pool.close()
            pool.join()
    seconds = time.perf_counter() - start
    done = all(os.path.isfile(os.path.join(dst, _shard_name(s) + ".json")) for s in range(num_shards))
    summary = {
        "destination": dst, "shards_total": num_shards, "shards_written": len(todo),
        "shards_already_done": skipped_shards, "images_processed": len(tasks),
        "seconds": seconds, "complete": done,
    }
    if done:
        meta = _finish(dst, settings, source, num_shards)
        summary.update(num_images=meta["num_images"], bad_images=meta["bad_images"],
                       converted_images=meta["converted_images"])
    return summary


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m repa_e_fast.data.prepare",
        description="ADM-centre-crop a raw image folder into compact, resumable tar shards.",
    )
    parser.add_argument("src", nargs="?", default=None,
                        help="raw ImageNet-style folder (<class>/<image>, or with train/)")
    parser.add_argument("dst", nargs="?", default=None,
                        help="output directory (re-run the same command to resume); default: data")
    parser.add_argument("--imagenet-path", default=None, help="official flag: the source folder (as SRC)")
    parser.add_argument("--output-dir", default=None, help="the output directory (as DST)")
    parser.add_argument("--max-images", type=int, default=None,
                        help="official flag: only the first N images of the source's order")
    parser.add_argument("--resolution", type=int, default=256, help="crop size (256 or 512)")
    parser.add_argument("--workers", type=int, default=max(1, (os.cpu_count() or 2) - 1))
    parser.add_argument("--format", dest="codec", choices=sorted(CODECS), default="png",
                        help="png: lossless (default); jpeg: ~4x smaller, GPU-decodable, lossy")
    parser.add_argument("--quality", type=int, default=95, help="JPEG quality (jpeg only)")
    parser.add_argument("--shard-size", type=int, default=1000, help="images per tar shard")
    parser.add_argument("--max-shards", type=int, default=None,
                        help="write at most this many shards now (re-run to continue)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    if (args.src is None) == (args.imagenet_path is None):
        parser.error("give the source folder once: SRC or --imagenet-path")
    if args.dst is not None and args.output_dir is not None:
        parser.error("give the output directory once: DST or --output-dir")
    src = args.src or args.imagenet_path
    dst = args.dst or args.output_dir or "data"
    try:
        summary = prepare(src, dst, resolution=args.resolution, workers=args.workers,
                          codec=args.codec, quality=args.quality, shard_size=args.shard_size,
                          max_shards=args.max_shards, progress=not args.no_progress, max_images=args.max_images)
    except (DatasetError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(summary, indent=1))
    if not summary["complete"]:
        print("not finished: run the same command again to continue", file=sys.stderr)
    elif summary.get("bad_images"):
        print(f"{summary['bad_images']} image(s) skipped, listed in "
              f"{os.path.join(summary['destination'], 'bad_images.tsv')}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
