"""Image loader throughput: every loader x every source, plus crop fidelity and codec sizes.

    python benchmarks/bench_data.py                 # a few minutes on a small CPU
    python benchmarks/bench_data.py --smoke         # seconds: tiny data (a test runs it)
    python benchmarks/bench_data.py --data DIR      # your own raw image folder instead

Data: unless --data is given, --images synthetic photograph-like JPEGs (quality 90) with
an ImageNet-like size mix (mostly ~500x375, some larger up to 2000 px; see photo_sizes),
generated into a temporary directory. There are no real photographs on the CPU test
machine; decode and resize costs depend on size and entropy, which these imitate.
From that raw folder it builds the other sources: the official images.h5 layout (PNG,
level 0; needs h5py), and our prepared shards as PNG and as JPEG q95.

Measured, at --resolution, per-rank batch --batch-size, --workers DataLoader workers /
DALI threads: images/s of one full epoch after a warm-up epoch (the files are in the page
cache: this is the decode + crop cost, not disk), for
  * torch: PIL in DataLoader workers;
  * dali-cpu: DALI with device_id=None (all operators on the CPU);
  * dali-gpu: DALI mixed decoding and GPU resize (only when CUDA is available).
Also: DALI vs PIL crop fidelity on the raw folder (mean |difference| in grey levels),
prepare throughput, and per codec (PNG levels 0/6, JPEG q95 4:4:4, JPEG q90 4:2:0) the
bytes, PIL encode/decode time and mean error on ADM crops.
Writes JSON to --out-dir/data_<device>_<date>.json and prints a markdown table.
"""

from __future__ import annotations

import argparse
import datetime as dt
import io
import json
import os
import platform
import shlex
import sys
import tempfile
import time

import numpy as np
import PIL
import torch
from PIL import Image

from repa_e_fast.data import build_image_loader, dali_available
from repa_e_fast.data.crop import adm_center_crop
from repa_e_fast.data.demo import render_photo_like
from repa_e_fast.data.prepare import prepare
from repa_e_fast.data.sources import FolderSource

HERE = os.path.dirname(os.path.abspath(__file__))


def photo_sizes(n: int, seed: int = 0) -> list:
    """An ImageNet-like mix: ~70% around 500x375 (landscape/portrait), ~20% 300-800 px,
    ~10% 1000-2000 px."""
    rng = np.random.default_rng(seed)
    sizes = []
    for _ in range(n):
        u = rng.random()
        if u < 0.7:
            w, h = [(500, 375), (500, 333), (375, 500), (500, 400)][int(rng.integers(4))]
        elif u < 0.9:
            w, h = (int(v) for v in rng.integers(300, 800, 2))
        else:
            w, h = (int(v) for v in rng.integers(1000, 2000, 2))
        sizes.append((w, h))
    return sizes


def make_photo_folder(root: str, n: int, classes: int = 4) -> None:
    for i, (w, h) in enumerate(photo_sizes(n)):
        d = os.path.join(root, f"class{i % classes:02d}")
        os.makedirs(d, exist_ok=True)
        render_photo_like(w, h, seed=i).save(os.path.join(d, f"img{i:06d}.JPEG"), quality=90)


def make_official_h5(folder: str, out_dir: str, res: int) -> str:
    """The official preprocessing's images.h5 layout (docs/data.md#sources) of ``folder``."""
    import h5py

    source = FolderSource(folder)
    os.makedirs(out_dir, exist_ok=True)
    names, labels = [], []
    with h5py.File(os.path.join(out_dir, "images.h5"), "w") as h5:
        for g in range(source.num_images):
            with Image.open(source.name(g)) as image:
                crop = adm_center_crop(image.convert("RGB"), res)
            buffer = io.BytesIO()
            crop.save(buffer, format="PNG", compress_level=0)
            key = f"{g:08d}"[:5] + f"/img{g:08d}.png"
            h5.create_dataset(key, data=np.bytes_(buffer.getvalue()))
            names.append(key)
            labels.append([key, int(source.labels[g])])
        h5.create_dataset("dataset.json", data=np.bytes_(json.dumps({"labels": labels}).encode()))
    with open(os.path.join(out_dir, "images_h5.json"), "w") as f:
        json.dump(sorted({n.split("/")[0] for n in names}) + names + ["dataset.json"], f)
    return out_dir


def measure(path, loader_kind, args) -> dict:
    kind = "torch" if loader_kind == "torch" else "dali"
    device = torch.device("cuda") if loader_kind == "dali-gpu" else torch.device("cpu")
    loader = build_image_loader(path, args.batch_size, resolution=args.resolution, loader=kind,
                                device=device, num_workers=args.workers, seed=0)
    for _ in loader:  # warm-up epoch: worker start, pipeline build, page cache
        pass
    if device.type == "cuda":
        torch.cuda.synchronize()
    start, images = time.perf_counter(), 0
    while True:
        for batch, _ in loader:
            images += batch.shape[0]
        if device.type == "cuda":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - start
        if seconds >= args.seconds:
            break
    loader.close()
    return {"images_per_s": images / seconds, "images": images, "seconds": seconds,
            "bad_images": loader.stats["bad_images"]}


def crop_fidelity(folder: str, res: int, device: torch.device) -> dict:
    kwargs = dict(resolution=res, shuffle=False, drop_last=False, num_workers=1, return_indices=True)
    pil = {int(i): x.numpy() for xs, _, idx in build_image_loader(folder, 8, loader="torch", **kwargs)
           for x, i in zip(xs, idx)}
    dali = {int(i): x.cpu().numpy() for xs, _, idx in
            build_image_loader(folder, 8, loader="dali", device=device, **kwargs)
            for x, i in zip(xs, idx)}
    errors = [float(np.abs(pil[i].astype(int) - dali[i].astype(int)).mean()) for i in sorted(pil)]
    worst = int(np.argmax(errors))
    return {"device": str(device), "images": len(errors), "mean_abs_diff": float(np.mean(errors)),
            "max_image_mean_abs_diff": errors[worst], "worst_image": FolderSource(folder).relpath(worst),
            "max_pixel_abs_diff": int(max(np.abs(pil[i].astype(int) - dali[i].astype(int)).max() for i in pil))}


CODECS = [  # name, PIL format, save options
    ("png level 0 (official images.h5)", "PNG", {"compress_level": 0}),
    ("png level 6 (prepare default)", "PNG", {"compress_level": 6}),
    ("jpeg q95 4:4:4 (prepare --format jpeg)", "JPEG", {"quality": 95, "subsampling": 0}),
    ("jpeg q90 4:2:0", "JPEG", {"quality": 90}),
]


def codec_table(folder: str, res: int, count: int) -> list:
    """Bytes, PIL encode/decode time and loss of each codec on ``count`` ADM crops."""
    source = FolderSource(folder)
    crops = []
    for i in range(min(count, source.num_images)):
        with Image.open(source.name(i)) as image:
            crops.append(adm_center_crop(image.convert("RGB"), res))
    rows = []
    for name, fmt, options in CODECS:
        encode_ms = decode_ms = float("inf")
        for _ in range(3):  # best of 3: the machine may be shared
            start = time.perf_counter()
            encoded = []
            for crop in crops:
                buffer = io.BytesIO()
                crop.save(buffer, format=fmt, **options)
                encoded.append(buffer.getvalue())
            encode_ms = min(encode_ms, (time.perf_counter() - start) / len(crops) * 1e3)
            start = time.perf_counter()
            decoded = [np.asarray(Image.open(io.BytesIO(data)).convert("RGB")) for data in encoded]
            decode_ms = min(decode_ms, (time.perf_counter() - start) / len(crops) * 1e3)
        error = np.mean([np.abs(d.astype(int) - np.asarray(c).astype(int)).mean() for d, c in zip(decoded, crops)])
        rows.append({"codec": name, "kib_per_image": float(np.mean([len(e) for e in encoded]) / 1024),
                     "encode_ms": encode_ms, "pil_decode_ms": decode_ms, "mean_abs_error": float(error)})
    return rows


def versions() -> dict:
    out = {"python": platform.python_version(), "torch": torch.__version__, "numpy": np.__version__,
           "pillow": PIL.__version__}
    try:
        import nvidia.dali

        out["dali"] = nvidia.dali.__version__
    except ImportError:
        out["dali"] = None
    try:
        import h5py

        out["h5py"] = h5py.__version__
    except ImportError:
        out["h5py"] = None
    return out


def device_name() -> tuple:
    if torch.cuda.is_available():
        name = torch.cuda.get_device_name(0)
    else:
        name = "cpu"
        try:
            with open("/proc/cpuinfo") as f:
                name = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
        except (OSError, StopIteration):
            pass
    slug = "cpu" if not torch.cuda.is_available() else "".join(
        c if c.isalnum() else "_" for c in name.lower()).strip("_")
    return name, slug


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=None, help="a raw image folder to use instead of synthetic photos")
    ap.add_argument("--images", type=int, default=512, help="synthetic photos to generate")
    ap.add_argument("--resolution", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--workers", type=int, default=max(1, (os.cpu_count() or 2)),
                    help="DataLoader workers / DALI CPU threads")
    ap.add_argument("--seconds", type=float, default=5.0, help="minimum timed seconds per case")
    ap.add_argument("--out-dir", default=os.path.join(HERE, "results"))
    ap.add_argument("--smoke", action="store_true", help="tiny data and times (a test runs this)")
    args = ap.parse_args(argv)
    if args.smoke:
        args.images, args.resolution, args.batch_size, args.seconds = 16, 64, 4, 0.0
        args.workers = min(args.workers, 2)

    tmp = tempfile.TemporaryDirectory(prefix="bench_data_")
    work = tmp.name
    folder = args.data or os.path.join(work, "raw")
    if args.data is None:
        t = time.perf_counter()
        make_photo_folder(folder, args.images)
        print(f"generated {args.images} synthetic photos in {time.perf_counter() - t:.1f} s", flush=True)
    sources = {"folder": folder}
    prepare_stats = {}
    for codec in ("png", "jpeg"):
        dst = os.path.join(work, f"prepared_{codec}")
        summary = prepare(folder, dst, resolution=args.resolution, workers=args.workers, codec=codec,
                          progress=False)
        index = np.load(os.path.join(dst, "index.npy"))
        prepare_stats[codec] = {"images_per_s": summary["images_processed"] / summary["seconds"],
                                "mean_bytes_per_image": float(index[:, 2].mean())}
        sources[f"prepared_{codec}"] = dst
    try:
        import h5py  # noqa: F401

        sources["h5"] = make_official_h5(folder, os.path.join(work, "official"), args.resolution)
    except ImportError:
        print("h5py not installed: skipping the official images.h5 source")

    loaders = ["torch"]
    if dali_available():
        loaders.append("dali-cpu")
        if torch.cuda.is_available():
            loaders.append("dali-gpu")
    rows = []
    for source, path in sources.items():
        for kind in loaders:
            result = measure(path, kind, args)
            rows.append({"loader": kind, "source": source, **result})
            print(f"{kind:9s} {source:15s} {result['images_per_s']:9.1f} img/s", flush=True)
    codecs = codec_table(folder, args.resolution, count=8 if args.smoke else 64)
    fidelity = {}
    if dali_available():
        fidelity["dali-cpu"] = crop_fidelity(folder, args.resolution, torch.device("cpu"))
        if torch.cuda.is_available():
            fidelity["dali-gpu"] = crop_fidelity(folder, args.resolution, torch.device("cuda"))

    name, slug = device_name()
    now = dt.datetime.now()
    report = {
        "meta": {
            "device": name, "date": now.isoformat(timespec="seconds"),
            "command": "python benchmarks/bench_data.py " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:])),
            "versions": versions(), "cpu_cores": len(os.sched_getaffinity(0)),
            "cuda": torch.cuda.is_available(),
            "data": args.data or f"{args.images} synthetic photo-like JPEGs (q90, ImageNet-like sizes)",
            "resolution": args.resolution, "batch_size": args.batch_size, "workers": args.workers,
            "min_seconds": args.seconds,
        },
        "rows": rows, "prepare": prepare_stats, "codecs": codecs, "crop_fidelity": fidelity,
    }
    os.makedirs(args.out_dir, exist_ok=True)
    out = os.path.join(args.out_dir, f"data_{'smoke_' if args.smoke else ''}{slug}_{now.date().isoformat()}.json")
    with open(out, "w") as f:
        json.dump(report, f, indent=1)

    print(f"\n| loader | {' | '.join(sources)} |\n|---|{'---:|' * len(sources)}")
    for kind in loaders:
        cells = [f"{r['images_per_s']:.0f}" for s in sources for r in rows if r["loader"] == kind and r["source"] == s]
        print(f"| {kind} | {' | '.join(cells)} |")
    for codec, stats in prepare_stats.items():
        print(f"prepare {codec}: {stats['images_per_s']:.0f} img/s, {stats['mean_bytes_per_image'] / 1024:.1f} KiB/image")
    print("\n| codec | KiB/image | PIL encode ms | PIL decode ms | mean abs error |\n|---|---:|---:|---:|---:|")
    for c in codecs:
        print(f"| {c['codec']} | {c['kib_per_image']:.1f} | {c['encode_ms']:.2f} | {c['pil_decode_ms']:.2f} | "
              f"{c['mean_abs_error']:.2f} |")
    for where, f in fidelity.items():
        print(f"crop fidelity {where}: mean |DALI - PIL| = {f['mean_abs_diff']:.4f} grey levels "
              f"(worst image {f['max_image_mean_abs_diff']:.4f}, worst pixel {f['max_pixel_abs_diff']})")
    print(f"wrote {out}")
    tmp.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
