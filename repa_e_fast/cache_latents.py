"""Cache VAE posterior moments for LDM-only training (official ``cache_latents.py``;
docs/workflows.md#repa_e_fastcache_latents-and-ldm-only-training).

    python -m repa_e_fast.cache_latents --data-dir data --vae f16d32 \\
        --vae-ckpt pretrained/e2e-vavae/e2e-vavae-400k.pt --output data/e2e-vavae-400k
    python -m repa_e_fast.cache_latents --vae-arch f16d32 --vae-ckpt-path VAE.pt \\
        --vae-latents-name e2e-vavae --pproc-batch-size 128      (official flags: data/e2e-vavae)
    torchrun --nproc_per_node 8 -m repa_e_fast.cache_latents ...   (ranks split the batches)

Reads the dataset in file order (no shuffle), encodes each image with the VAE in eval mode
and stores concat(mean, std) as float32 [2C, h, w], the label and the cropped uint8 image
(``data/cached_latents.py`` describes the files). Each rank writes part files; rank 0 merges
them in dataset order, dropping the duplicates that pad the last batch. Files are published
atomically (the record writer renames on close).
"""

import argparse
import json
import os
import shutil
import sys
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from .data.cached_latents import IMAGES_FILE, LATENTS_FILE, META_FILE
from .data.record_format import HEADER_SIZE, read_header
from .data.record_writer import RecordWriter
from .engine.runtime import setup_runtime
from .models.checkpoints import CheckpointError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="repa_e_fast.cache_latents", description=__doc__.split("\n")[0])
    parser.add_argument("--data-dir", default="data",
                        help="image dataset (folder, official images.h5, prepared); default: data (official)")
    parser.add_argument("--output", default=None,
                        help="output directory (latents.rec, images.rec, meta.json); "
                        "default: <output-dir>/<vae-latents-name>")
    parser.add_argument("--output-dir", default="data", help="with --vae-latents-name: where the cache goes")
    parser.add_argument("--vae-latents-name", default=None,
                        help="official: the cache's name; train with the same --data-dir and --vae-latents-name")
    parser.add_argument("--vae", "--vae-arch", dest="vae", default="f16d32", choices=("f8d4", "f16d32"))
    parser.add_argument("--vae-ch", type=int, default=128)
    parser.add_argument("--vae-ckpt", "--vae-ckpt-path", dest="vae_ckpt",
                        help="VAE state dict (strictly loaded); omit only with --allow-random-vae")
    parser.add_argument("--allow-random-vae", action="store_true", help="tests and demos: random VAE weights")
    parser.add_argument("--resolution", type=int, default=256)
    parser.add_argument("--pproc-batch-size", "--batch-size", dest="batch_size", type=int, default=128)
    parser.add_argument("--num-workers", type=int, default=4)
    parser.add_argument("--data-loader", default="auto", choices=("auto", "dali", "torch"))
    parser.add_argument("--data-backend", dest="renamed_data_backend", help=argparse.SUPPRESS)  # refused in main
    parser.add_argument("--mixed-precision", default="no", choices=("no", "bf16", "fp16"))
    return parser


def _encode_to_parts(args, rank, world, device, part_dir: Path):
    from .data import build_image_loader
    from .models.checkpoints import load_weights
    from .models.vae import build_vae, preprocess_images_for_vae

    vae = build_vae(args.vae, ch=args.vae_ch)
    if args.vae_ckpt:
        load_weights(vae, args.vae_ckpt, name=f"VAE {args.vae}")
    vae = vae.to(device).eval().requires_grad_(False)
    loader = build_image_loader(args.data_dir, args.batch_size, resolution=args.resolution, rank=rank,
                                world_size=world, device=device, loader=args.data_loader,
                                num_workers=args.num_workers, shuffle=False, drop_last=False, return_indices=True)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16 if args.mixed_precision == "bf16" else torch.float16,
                              enabled=args.mixed_precision != "no")
    latents_writer = images_writer = None
    all_indices = []
    show = rank == 0 and sys.stderr.isatty()
    from tqdm import tqdm

    for images, labels, indices in tqdm(loader, desc="cache latents", disable=not show):
        with torch.no_grad(), autocast:
            posterior = vae.encode(preprocess_images_for_vae(images))
        moments = torch.cat([posterior.mean, posterior.std], dim=1).float().cpu().numpy()
        if latents_writer is None:
            latents_writer = RecordWriter(part_dir / f"latents.{rank:05d}", "float32", moments.shape[1:])
            images_writer = RecordWriter(part_dir / f"images.{rank:05d}", "uint8", tuple(images.shape[1:]),
                                         with_labels=False)
        latents_writer.append(moments, labels.cpu().numpy())
        images_writer.append(images.cpu().numpy())
        all_indices.append(indices.cpu().numpy())
    latents_writer.close()
    images_writer.close()
    np.save(part_dir / f"indices.{rank:05d}.npy", np.concatenate(all_indices))
    return loader.num_images, loader.num_classes, getattr(loader, "stats", {}).get("bad_images", 0)


def _merge_parts(part_dir: Path, world: int, output: Path, count: int) -> None:
    """Write every dataset index once, in order, from the ranks' part files."""
    sources = []
    for rank in range(world):
        latents_info = read_header(str(part_dir / f"latents.{rank:05d}"))
        images_info = read_header(str(part_dir / f"images.{rank:05d}"))
        n = latents_info.count
        sources.append(dict(
            indices=np.load(part_dir / f"indices.{rank:05d}.npy"),
            latents=np.memmap(latents_info.path, dtype=latents_info.storage_dtype, mode="r", offset=HEADER_SIZE,
                              shape=(n, *latents_info.record_shape)),
            labels=np.memmap(latents_info.path, dtype="<i8", mode="r", offset=latents_info.labels_offset, shape=(n,)),
            images=np.memmap(images_info.path, dtype=images_info.storage_dtype, mode="r", offset=HEADER_SIZE,
                             shape=(n, *images_info.record_shape)),
            shapes=(latents_info.record_shape, images_info.record_shape)))
    where = np.full((count, 2), -1, dtype=np.int64)  # dataset index -> (part, row)
    for part, source in enumerate(sources):
        where[source["indices"], 0] = part
        where[source["indices"], 1] = np.arange(len(source["indices"]))
    if (where[:, 0] < 0).any():
        raise RuntimeError(f"{int((where[:, 0] < 0).sum())} images were not encoded by any rank")
    latent_shape, image_shape = sources[0]["shapes"]
    with RecordWriter(output / LATENTS_FILE, "float32", latent_shape, record_crcs=True) as latents_out, \
            RecordWriter(output / IMAGES_FILE, "uint8", image_shape, with_labels=False, record_crcs=True) as images_out:
        chunk = 1024
        for start in range(0, count, chunk):
            rows = where[start:start + chunk]
            latents = np.stack([sources[p]["latents"][r] for p, r in rows])
            labels = np.array([sources[p]["labels"][r] for p, r in rows], dtype=np.int64)
            images = np.stack([sources[p]["images"][r] for p, r in rows])
            latents_out.append(latents, labels)
            images_out.append(images)


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.renamed_data_backend is not None:
        print("error: flag --data-backend was renamed to --data-loader", file=sys.stderr)
        return 2
    if args.output is None:
        if not args.vae_latents_name:
            print("error: name the cache: --output DIR, or --vae-latents-name NAME (written to <output-dir>/NAME)",
                  file=sys.stderr)
            return 2
        args.output = os.path.join(args.output_dir, args.vae_latents_name)
    if not args.vae_ckpt and not args.allow_random_vae:
        print("error: --vae-ckpt is required (a VAE state dict, e.g. pretrained/e2e-vavae/e2e-vavae-400k.pt)",
              file=sys.stderr)
        return 2
    if args.vae_ckpt and not os.path.isfile(args.vae_ckpt):
        print(f"error: VAE checkpoint not found: {args.vae_ckpt}", file=sys.stderr)
        return 2
    if args.vae_ckpt:
        from .engine.checkpoint import verify_enclosing_checkpoint
        from .models.checkpoints import CheckpointError

        try:
            verify_enclosing_checkpoint(args.vae_ckpt)
        except CheckpointError as error:
            print(f"error: {error}", file=sys.stderr)
            return 2
    if not os.path.exists(args.data_dir):
        print(f"error: dataset not found: {args.data_dir}", file=sys.stderr)
        return 2
    runtime = setup_runtime()  # torchrun: a process group, one device per rank
    rank, world, device = runtime.rank, runtime.world_size, runtime.device
    output = Path(args.output)
    part_dir = output / ".parts"
    if rank == 0:
        output.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(part_dir, ignore_errors=True)
        part_dir.mkdir()
    if dist.is_initialized():
        dist.barrier()
    try:
        count, num_classes, bad = _encode_to_parts(args, rank, world, device, part_dir)
    except CheckpointError as error:  # the VAE file does not fit, or is refused (it would run code)
        shutil.rmtree(part_dir, ignore_errors=True)
        print(f"error: {error}", file=sys.stderr)
        return 2
    if dist.is_initialized():
        dist.barrier()
    if rank == 0:
        _merge_parts(part_dir, world, output, count)
        shutil.rmtree(part_dir, ignore_errors=True)
        meta = {"vae": args.vae, "vae_ckpt": args.vae_ckpt, "resolution": args.resolution, "count": count,
                "num_classes": num_classes, "bad_images": bad, "data_dir": str(args.data_dir),
                "moments": "concat(mean, std) float32 [2C, h, w]"}
        tmp = output / (META_FILE + ".tmp")
        tmp.write_text(json.dumps(meta, indent=2))
        os.replace(tmp, output / META_FILE)
        print(f"cached {count} latents of {args.data_dir} in {output}")
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
