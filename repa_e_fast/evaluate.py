"""Score generated samples: FID, sFID, Inception Score, precision and recall.

    python -m repa_e_fast.evaluate SAMPLES.npz REFERENCE.npz [--inception PATH]

The metrics are those of OpenAI's ADM evaluation suite (guided-diffusion ``evaluations/
evaluator.py``), which the REPA-E paper uses: ``.npz`` files with ``arr_0`` = uint8 images
[N, H, W, 3] (what ``repa_e_fast.generate`` writes and what ADM's reference batches such as
``VIRTUAL_imagenet256_labeled.npz`` hold).

- FID: Fréchet distance of the 2048-d ``pool_3`` features; sFID: the same on the 2023-d
  spatial features (``mixed_6/conv``, 7 channels). When the reference ``.npz`` carries
  precomputed statistics (``mu``, ``sigma``, ``mu_s``, ``sigma_s``, as ADM's reference batches
  do) they are used for the reference side, exactly as the evaluator does; otherwise they are
  computed from its images.
- Inception Score of the samples (splits of 5000 => 10 splits for 50k samples).
- Precision / recall (k = 3) between the reference images' and the samples' pool features
  (needs ``arr_0`` in the reference; reported as n/a otherwise).

Which file is which: ``--ref REF.npz --samples SAMPLES.npz`` says it explicitly. Two positional
files are taken in either order when exactly one of them carries reference statistics
(``mu``, ``sigma``, ... as every ADM reference batch does), so ADM's ``evaluator.py REF_BATCH
SAMPLE_BATCH`` command line works unchanged; when neither or both do, the order cannot be
told and the command refuses (exit 2) rather than silently swapping precision and recall and
scoring IS on the reference set.
The Inception network is ``repa_e_fast.metrics.inception`` with weights from a local
``pt_inception-2015-12-05-6726825d.pth`` (``--inception`` or ``pretrained/``).
"""

import argparse
import json
import os
import sys
import zipfile
from contextlib import contextmanager
from typing import Dict, Iterator, Optional

import numpy as np
import torch

from .metrics import (
    feature_statistics,
    frechet_distance,
    inception_score,
    load_inception,
    precision_recall,
    resolve_inception_path,
    softmax,
)
from .metrics.fid import check_statistics

REFERENCE_STATISTICS_KEYS = ("mu", "sigma", "mu_s", "sigma_s")


# ----------------------------------------------------------------------------------------
# Reading .npz image batches without loading 50k images at once
# ----------------------------------------------------------------------------------------
def npz_keys(path: str) -> list:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"npz file not found: {path}")
    try:
        with zipfile.ZipFile(path) as archive:
            return [name[: -len(".npy")] for name in archive.namelist() if name.endswith(".npy")]
    except zipfile.BadZipFile as error:
        raise ValueError(f"{path} is not an .npz file ({error})") from None


@contextmanager
def open_npz_images(path: str, key: str = "arr_0"):
    """Yield ``(count, read_batches)``; ``read_batches(batch_size)`` streams uint8 [B, H, W, 3]
    arrays straight from the zip member (an uncompressed ``np.savez`` member is read
    sequentially, a compressed one is decompressed on the fly)."""
    if key not in npz_keys(path):
        raise ValueError(f"{path} has no {key!r} array (keys: {npz_keys(path)})")
    with zipfile.ZipFile(path) as archive, archive.open(f"{key}.npy") as member:
        version = np.lib.format.read_magic(member)
        if version == (1, 0):
            shape, fortran_order, dtype = np.lib.format.read_array_header_1_0(member)
        elif version == (2, 0):
            shape, fortran_order, dtype = np.lib.format.read_array_header_2_0(member)
        else:
            raise ValueError(f"{path}[{key!r}] uses .npy format version {version}; expected 1.0 or 2.0")
        if dtype != np.uint8 or len(shape) != 4 or shape[3] != 3:
            raise ValueError(f"{path}[{key!r}] must be uint8 images [N, H, W, 3], got {dtype} {list(shape)}")
        if fortran_order:
            raise ValueError(f"{path}[{key!r}] is stored in Fortran order; save it C-contiguous")
        image_bytes = int(np.prod(shape[1:]))

        def read_batches(batch_size: int) -> Iterator[np.ndarray]:
            for start in range(0, shape[0], batch_size):
                count = min(batch_size, shape[0] - start)
                data = member.read(count * image_bytes)
                if len(data) != count * image_bytes:
                    raise ValueError(f"{path}[{key!r}] is truncated")
                yield np.frombuffer(data, dtype=np.uint8).reshape(count, *shape[1:])

        yield shape[0], read_batches


# ----------------------------------------------------------------------------------------
# Features and metrics
# ----------------------------------------------------------------------------------------
@torch.no_grad()
def compute_activations(model, path: str, batch_size: int = 100, device="cpu") -> Dict[str, np.ndarray]:
    """Inception features of every image in ``path``: pool [N,2048], spatial [N,2023],
    logits [N,1008] (float32 numpy)."""
    outputs = {"pool": [], "spatial": [], "logits": []}
    with open_npz_images(path) as (count, read_batches):
        done = 0
        for batch in read_batches(batch_size):
            images = torch.from_numpy(batch.copy()).to(device).permute(0, 3, 1, 2).float()
            for name, value in model(images).items():
                outputs[name].append(value.float().cpu().numpy())
            done += len(batch)
            print(f"  {path}: {done}/{count} images", end="\r", file=sys.stderr, flush=True)
        print(file=sys.stderr)
    return {name: np.concatenate(values) for name, values in outputs.items()}


def reference_statistics(path: str, activations: Optional[Dict[str, np.ndarray]]):
    """((mu, sigma), (mu_s, sigma_s)) of the reference: precomputed ones if the file has them
    (as ADM's evaluator prefers), else from its activations."""
    keys = npz_keys(path)
    if "mu" in keys:
        missing = [k for k in REFERENCE_STATISTICS_KEYS if k not in keys]
        if missing:
            raise ValueError(f"{path} has precomputed 'mu' but lacks {missing}")
        with np.load(path) as stats:
            # Checked here, before any Inception pass over the samples.
            return (check_statistics(stats["mu"], stats["sigma"], f"{path} (mu, sigma)"),
                    check_statistics(stats["mu_s"], stats["sigma_s"], f"{path} (mu_s, sigma_s)"))
    if activations is None:
        raise ValueError(f"{path} has neither images ('arr_0') nor statistics {list(REFERENCE_STATISTICS_KEYS)}")
    return feature_statistics(activations["pool"]), feature_statistics(activations["spatial"])


def evaluate(
    samples_path: str,
    reference_path: str,
    model,
    batch_size: int = 100,
    device="cpu",
    is_split_size: int = 5000,
    k: int = 3,
) -> Dict[str, Optional[float]]:
    """All five metrics; ``precision`` / ``recall`` are None when the reference has no images."""
    if "arr_0" not in npz_keys(samples_path):
        raise ValueError(f"samples file {samples_path} has no 'arr_0' images (keys: {npz_keys(samples_path)})")
    reference_keys = npz_keys(reference_path)
    if "mu" in npz_keys(samples_path) and "mu" not in reference_keys:
        print(
            f"warning: {samples_path} carries reference statistics and {reference_path} does not: "
            "are the arguments swapped? (order: SAMPLES REFERENCE; ADM's evaluator takes the reference first)",
            file=sys.stderr,
        )

    # Precomputed statistics are read (and checked) before any Inception pass.
    reference_stats = reference_statistics(reference_path, None) if "mu" in reference_keys else None
    reference_acts = None
    if "arr_0" in reference_keys:
        print("computing reference batch activations...", file=sys.stderr)
        reference_acts = compute_activations(model, reference_path, batch_size, device)
    if reference_stats is None:
        reference_stats = reference_statistics(reference_path, reference_acts)
    (ref_mu, ref_sigma), (ref_mu_s, ref_sigma_s) = reference_stats

    print("computing sample batch activations...", file=sys.stderr)
    sample_acts = compute_activations(model, samples_path, batch_size, device)
    sample_mu, sample_sigma = feature_statistics(sample_acts["pool"])
    sample_mu_s, sample_sigma_s = feature_statistics(sample_acts["spatial"])

    results: Dict[str, Optional[float]] = {
        "inception_score": inception_score(softmax(sample_acts["logits"]), split_size=is_split_size),
        "fid": frechet_distance(sample_mu, sample_sigma, ref_mu, ref_sigma),
        "sfid": frechet_distance(sample_mu_s, sample_sigma_s, ref_mu_s, ref_sigma_s),
        "precision": None,
        "recall": None,
    }
    if reference_acts is not None:
        precision, recall = precision_recall(
            torch.from_numpy(reference_acts["pool"]).to(device), torch.from_numpy(sample_acts["pool"]).to(device), k=k
        )
        results.update(precision=precision, recall=recall)
    return results


# ----------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m repa_e_fast.evaluate",
        description="FID, sFID, Inception Score, precision and recall of a sample .npz against a reference "
        ".npz (ADM evaluation-suite definitions).",
    )
    parser.add_argument("files", nargs="*", metavar="NPZ",
                        help="two .npz files in either order (the one with mu/sigma is the reference); "
                        "or use --ref / --samples")
    parser.add_argument("--ref", default=None,
                        help="reference batch: .npz with arr_0 images and/or mu, sigma, mu_s, sigma_s")
    parser.add_argument("--samples", default=None, help="generated samples: .npz with arr_0 = uint8 [N,H,W,3]")
    parser.add_argument("--inception", default=None,
                        help="Inception weights file (default: pretrained/pt_inception-2015-12-05-6726825d.pth)")
    parser.add_argument("--batch-size", type=int, default=100, help="images per Inception forward")
    parser.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    parser.add_argument("--is-split-size", type=int, default=5000, help="Inception Score split size (ADM: 5000)")
    parser.add_argument("--pr-k", type=int, default=3, help="k-th nearest neighbour for precision/recall (ADM: 3)")
    parser.add_argument("--json", default=None, help="also write the metrics to this JSON file")
    return parser


def carries_reference_statistics(path: str) -> bool:
    return "mu" in npz_keys(path)


def resolve_inputs(files, ref: Optional[str], samples: Optional[str]):
    """(samples, reference) from ``--samples`` / ``--ref`` or two positional files in either
    order; ``ValueError`` (one line) when the roles cannot be told apart."""
    if ref or samples:
        if files or not (ref and samples):
            raise ValueError("give both --ref REF.npz and --samples SAMPLES.npz, and no positional files")
        for path in (samples, ref):
            npz_keys(path)
        return samples, ref
    if len(files) != 2:
        raise ValueError(f"expected two .npz files (or --ref REF.npz --samples SAMPLES.npz), got {len(files)}")
    with_statistics = [path for path in files if carries_reference_statistics(path)]
    if len(with_statistics) != 1:
        which = "both carry" if with_statistics else "neither carries"
        raise ValueError(f"cannot tell which of {files[0]} and {files[1]} is the reference batch ({which} "
                         "reference statistics mu/sigma): name them with --ref REF.npz --samples SAMPLES.npz")
    reference = with_statistics[0]
    sample_file = files[1] if reference == files[0] else files[0]
    print(f"reference batch: {reference} (it carries mu/sigma); samples: {sample_file}", file=sys.stderr)
    return sample_file, reference


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        # Missing / unreadable files and unclear roles fail here, before the network is built.
        args.samples, args.reference = resolve_inputs(args.files, args.ref, args.samples)
        model = load_inception(resolve_inception_path(args.inception), device=device)
    except (OSError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if device.startswith("cuda"):
        # Features in full fp32 (no TF32), like the TensorFlow graph the metrics were defined with.
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    try:
        results = evaluate(args.samples, args.reference, model, args.batch_size, device, args.is_split_size, args.pr_k)
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    labels = {"inception_score": "Inception Score", "fid": "FID", "sfid": "sFID",
              "precision": "Precision", "recall": "Recall"}
    for key, label in labels.items():
        value = results[key]
        print(f"{label}: {'n/a (reference has no images)' if value is None else value}")
    if args.json:
        with open(args.json, "w") as handle:
            json.dump({"samples": args.samples, "reference": args.reference, **results}, handle, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
