"""Generate samples for FID from a trained SiT: the official ``generate.py``
(docs/workflows.md#repa_e_fastgenerate).

    python -m repa_e_fast.generate --exp-path EXP_DIR --train-steps 400000 --mode sde --num-steps 250
    python -m repa_e_fast.generate --ckpt CHECKPOINT.pt [--args-json args.json] ...
    torchrun --nproc_per_node 8 -m repa_e_fast.generate ...

Writes ``<sample-dir>/<exp_name>_<step>_cfg<w>-<low>-<high>/<index:06d>.png`` and then the
``.npz`` beside that folder (``arr_0``: uint8 [N, H, W, 3]) that the ADM evaluation suite and
``repa_e_fast.evaluate`` read, and ``<folder>.source.json`` (the checkpoint file and the sampling
flags that made it). If that ``.npz`` already exists and was made from the same checkpoint and
flags, nothing is loaded or sampled; made from another one, it is an error (exit 2), never a
silent reuse. ``--ckpt <exp>/checkpoints/<step>/official.pt`` names the folder ``<exp>_<step>``.

Semantics kept from the official script (same seeds, draws and indices):
- the SiT is built from the run's arguments (``args.json`` or the checkpoint's ``args``); the
  encoder types only give the projector widths (no encoder weights are read); the
  checkpoint's ``ema`` is loaded strictly and put in eval mode;
- VAE + latent statistics: a REPA-E checkpoint's own ``vae`` with
  ``scale = rsqrt(ema bn.running_var)``, ``bias = ema bn.running_mean``; an LDM-only
  checkpoint (no ``vae``) uses ``--vae-ckpt`` (default: the run's ``vae_ckpt``) and its
  ``-latents-stats.pt``;
- rank ``r`` of ``W`` seeds torch with ``((global_seed + r) * W) // 2`` (here just before the
  sampling loop, so model construction cannot shift the stream on CPU; on CUDA this is the
  official stream); each iteration draws ``z`` [n, C, h, w] then labels ``randint(0,
  num_classes, (n,))``; image ``i`` of iteration ``it`` is global index
  ``i * W + r + it * n * W``; ``ceil(N / (n W)) * n W`` images are made (the extra ones are
  saved as PNGs but not put in the ``.npz``, as officially);
- decoding: ``x / scale + bias``, VAE decode, ``(v + 1) / 2``, ``clamp(255 v, 0, 255)``, cast to
  uint8 by truncation (no rounding).

Addition: ``--class-balanced`` gives exactly ``N / num_classes`` images per class: a fixed
schedule (class ``c`` repeated ``N / num_classes`` times, shuffled with ``global_seed``, the
same on every rank) assigns the label of global index ``g < N``. The uniform label draw still
happens (and is overwritten), so ``z`` and the sampler noise are the same as without the
flag. The folder name gets ``-balanced`` appended.
"""

import argparse
import json
import math
import os
import re
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import numpy as np
import torch
import torch.distributed as dist
from PIL import Image
from tqdm import tqdm

from .engine.official_format import checkpoint_entry, load_vae, read_checkpoint
from .engine.runtime import setup_runtime
from .models.checkpoints import (
    CheckpointError,
    load_latents_stats,
    load_state_dict_file,
    load_state_dict_strict,
)
from .models.encoders import parse_enc_type
from .models.sit import SiT, build_sit
from .models.vae import VAE_LAYOUTS, AutoencoderKL
from .sampling import denormalize_latents, euler_maruyama_sampler, euler_sampler

# Official training defaults for entries a run's arguments may lack (bn_momentum is None when
# absent, as the official generate.py passes for LDM-only runs: harmless in eval mode,
# docs/numerics.md#ldm-only-generation-and-bn_momentum).
TRAINING_DEFAULTS = {
    "resolution": 256,
    "num_classes": 1000,
    "cfg_prob": 0.1,
    "encoder_depth": 8,
    "qk_norm": False,
    "fused_attn": True,
    "bn_momentum": None,
    "projector_dim": 2048,  # not an official flag; read when a run records it
    "vae_ckpt": None,
}
REQUIRED_RUN_ARGUMENTS = ("model", "vae", "enc_type")
CHECKPOINT_STEP_DIR = re.compile(r"^\d{7}$")  # our checkpoints/<step:07d>/official.pt
# What makes two sample sets the same: the checkpoint file and the flags that change the images.
SAMPLING_OPTIONS = ("mode", "num_steps", "cfg_scale", "guidance_low", "guidance_high", "path_type", "heun",
                    "num_fid_samples", "pproc_batch_size", "global_seed", "class_balanced", "vae_ckpt")


# ----------------------------------------------------------------------------------------
# Checkpoints and run arguments
# ----------------------------------------------------------------------------------------
def experiment_paths(exp_path: str, train_steps) -> Tuple[str, str]:
    """Official layout: ``<exp>/args.json`` and ``<exp>/checkpoints/<steps zero-padded to 7>.pt``
    (or a repa_e_fast run's ``checkpoints/<steps>/official.pt``)."""
    if not os.path.isdir(exp_path):
        raise FileNotFoundError(f"experiment directory not found: {exp_path}")
    args_json = os.path.join(exp_path, "args.json")
    if not os.path.isfile(args_json):
        raise FileNotFoundError(f"{args_json} not found (an experiment directory holds args.json and checkpoints/)")
    from .engine.checkpoint import official_checkpoint_file

    return official_checkpoint_file(exp_path, train_steps), args_json


def run_arguments(checkpoint: Dict, checkpoint_path: str, args_json: Optional[str]) -> Dict:
    """The training run's arguments: ``args_json`` if given, else the checkpoint's ``args``
    (an argparse.Namespace or a dict), completed with the official training defaults."""
    if args_json:
        if not os.path.isfile(args_json):
            raise FileNotFoundError(f"args file not found: {args_json}")
        with open(args_json) as handle:
            try:
                arguments, source = json.load(handle), args_json
            except json.JSONDecodeError as error:
                raise ValueError(f"{args_json} is not valid JSON: {error}") from None
    elif "args" in checkpoint:
        arguments, source = checkpoint["args"], f"{checkpoint_path}['args']"
        arguments = vars(arguments) if isinstance(arguments, argparse.Namespace) else arguments
    else:
        raise CheckpointError(f"{checkpoint_path} has no 'args' entry: pass --args-json (the run's args.json)")
    if not isinstance(arguments, dict):
        raise CheckpointError(f"{source} is a {type(arguments).__name__}, expected a mapping of run arguments")
    missing = [name for name in REQUIRED_RUN_ARGUMENTS if arguments.get(name) in (None, "")]
    if missing:
        raise CheckpointError(f"{source} lacks the run arguments {missing}")
    return {**TRAINING_DEFAULTS, **{k: v for k, v in arguments.items() if v is not None}}


# ----------------------------------------------------------------------------------------
# Models
# ----------------------------------------------------------------------------------------
def encoder_dims(enc_type: str) -> List[int]:
    """Feature widths of the REPA encoders (projector output sizes), from the type string alone."""
    return [spec.embed_dim for spec in parse_enc_type(enc_type)]


def build_sit_for_run(run_args: Dict) -> SiT:
    layout = run_args["vae"]
    if layout not in VAE_LAYOUTS:
        raise ValueError(f"unknown VAE layout {layout!r} in the run arguments; expected one of {sorted(VAE_LAYOUTS)}")
    downsample = 2 ** (len(VAE_LAYOUTS[layout]["ch_mult"]) - 1)
    resolution = int(run_args["resolution"])
    if resolution % downsample:
        raise ValueError(f"resolution {resolution} is not divisible by the {layout} VAE's factor {downsample}")
    kwargs = dict(
        input_size=resolution // downsample,
        in_channels=VAE_LAYOUTS[layout]["embed_dim"],
        num_classes=int(run_args["num_classes"]),
        class_dropout_prob=float(run_args["cfg_prob"]),
        z_dims=encoder_dims(run_args["enc_type"]),
        encoder_depth=int(run_args["encoder_depth"]),
        bn_momentum=run_args["bn_momentum"],
        qk_norm=bool(run_args["qk_norm"]),
        fused_attn=bool(run_args["fused_attn"]),
        projector_dim=int(run_args["projector_dim"]),
    )
    kwargs.update(run_args.get("model_overrides") or {})  # repa_e_fast runs: demo / test model sizes
    return build_sit(run_args["model"], **kwargs)


def latents_stats_path(vae_ckpt: str) -> str:
    root, extension = os.path.splitext(vae_ckpt)
    return f"{root}-latents-stats{extension}"


def load_vae_and_latent_stats(
    checkpoint: Dict, checkpoint_path: str, run_args: Dict, model: SiT, vae_ckpt: Optional[str]
) -> Tuple[AutoencoderKL, torch.Tensor, torch.Tensor]:
    """(vae, latents_scale, latents_bias) of the run (docs/workflows.md#repa_e_fastgenerate);
    ``model`` holds the loaded EMA weights."""
    layout = run_args["vae"]
    if "vae" in checkpoint:
        # REPA-E run: the jointly trained VAE and the EMA model's BN statistics
        # (docs/numerics.md#e2e-vae-latent-statistics).
        if vae_ckpt:
            print(f"note: {checkpoint_path} has its own 'vae'; --vae-ckpt {vae_ckpt} is not used", file=sys.stderr)
        vae = load_vae(layout, checkpoint_entry(checkpoint, "vae", checkpoint_path, "VAE"), f"{checkpoint_path}['vae']")
        stats = model.extract_latents_stats()
        return vae, stats["latents_scale"], stats["latents_bias"]
    # LDM-only run: a frozen VAE file and its statistics file.
    vae_path = vae_ckpt or run_args["vae_ckpt"]
    if not vae_path:
        raise CheckpointError(
            f"{checkpoint_path} has no 'vae' entry (LDM-only run) and the run arguments name no vae_ckpt: "
            "pass --vae-ckpt"
        )
    stats_path = latents_stats_path(vae_path)
    for path in (vae_path, stats_path):
        if not os.path.isfile(path):
            raise FileNotFoundError(f"VAE file not found: {path} (needed because {checkpoint_path} has no 'vae' entry)")
    vae = load_vae(layout, load_state_dict_file(vae_path), vae_path)
    stats = load_latents_stats(stats_path)
    shape = (1, model.in_channels, 1, 1)
    for name in ("latents_scale", "latents_bias"):
        if stats[name].numel() != model.in_channels:
            raise CheckpointError(
                f"{stats_path}: {name} has {stats[name].numel()} channels, the SiT has {model.in_channels}"
            )
    return vae, stats["latents_scale"].reshape(shape), stats["latents_bias"].reshape(shape)


@dataclass
class LoadedRun:
    model: SiT
    vae: AutoencoderKL
    latents_scale: torch.Tensor
    latents_bias: torch.Tensor
    run_name: str  # "<exp_name>_<step>" (official) or the checkpoint file's stem


def run_name_from_paths(ckpt: Optional[str], exp_path: Optional[str], train_steps) -> str:
    """``<exp_name>_<step zero-padded to 7>`` as officially; a lone ``--ckpt`` file is named by its
    stem, or like the official layout when it sits in ``<exp>/checkpoints/``, or, for our
    ``<dir>/<step:07d>/official.pt``, by the directory above the step and the step (so two steps
    of one run never share a sample folder)."""
    if exp_path:
        return f"{os.path.basename(os.path.normpath(exp_path))}_{str(train_steps).zfill(7)}"
    stem = os.path.splitext(os.path.basename(ckpt))[0]
    parent = os.path.dirname(os.path.abspath(ckpt))
    if os.path.basename(parent) == "checkpoints":
        return f"{os.path.basename(os.path.dirname(parent))}_{stem}"
    if CHECKPOINT_STEP_DIR.match(os.path.basename(parent)):
        above = os.path.dirname(parent)
        if os.path.basename(above) == "checkpoints":  # <exp>/checkpoints/<step>/official.pt
            above = os.path.dirname(above)
        name = f"{os.path.basename(above)}_{os.path.basename(parent)}"
        return name if stem == "official" else f"{name}_{stem}"
    return stem


def load_run(ckpt: Optional[str], exp_path: Optional[str], train_steps, args_json: Optional[str],
             vae_ckpt: Optional[str]) -> LoadedRun:
    """Everything generation needs from disk, with one-line errors for missing pieces."""
    if exp_path:
        checkpoint_path, args_json = experiment_paths(exp_path, train_steps)
    else:
        checkpoint_path = ckpt
    checkpoint = read_checkpoint(checkpoint_path)
    run_args = run_arguments(checkpoint, checkpoint_path, args_json)
    ema = checkpoint_entry(checkpoint, "ema", checkpoint_path, "generation samples from the EMA SiT")
    model = build_sit_for_run(run_args)
    load_state_dict_strict(model, ema, f"{run_args['model']} (ema of {checkpoint_path})")
    model.eval()  # no label dropout, BN statistics frozen (docs/numerics.md#label-dropout-and-the-null-label)
    vae, scale, bias = load_vae_and_latent_stats(checkpoint, checkpoint_path, run_args, model, vae_ckpt)
    return LoadedRun(model, vae, scale.float(), bias.float(), run_name_from_paths(ckpt, exp_path, train_steps))


# ----------------------------------------------------------------------------------------
# Sampling plan (pure functions: the tests check them against the files written)
# ----------------------------------------------------------------------------------------
def rank_seed(global_seed: int, rank: int, world_size: int) -> int:
    return ((global_seed + rank) * world_size) // 2  # official (docs/numerics.md#generation-seeds)


def num_iterations(num_samples: int, batch_size: int, world_size: int) -> int:
    return math.ceil(num_samples / (batch_size * world_size))


def global_indices(rank: int, world_size: int, batch_size: int, iteration: int) -> torch.Tensor:
    """Global image indices of one batch: ``i * W + r + it * n * W`` (official)."""
    return torch.arange(batch_size) * world_size + rank + iteration * batch_size * world_size


def class_balanced_labels(num_samples: int, num_classes: int, seed: int) -> torch.Tensor:
    """Label of every global index ``< num_samples``: each class exactly ``num_samples / num_classes``
    times, shuffled by a CPU generator seeded with ``seed`` (identical on every rank)."""
    if num_samples % num_classes:
        raise ValueError(
            f"--class-balanced needs --num-fid-samples ({num_samples}) divisible by the number of classes "
            f"({num_classes})"
        )
    labels = torch.arange(num_classes).repeat_interleave(num_samples // num_classes)
    return labels[torch.randperm(num_samples, generator=torch.Generator().manual_seed(seed))]


def sample_folder(sample_dir: str, run_name: str, cfg_scale: float, low: float, high: float, balanced: bool) -> str:
    name = f"{run_name}_cfg{cfg_scale}-{low}-{high}" + ("-balanced" if balanced else "")
    return os.path.join(sample_dir, name)


# ----------------------------------------------------------------------------------------
# Generation
# ----------------------------------------------------------------------------------------
def decode_to_uint8(vae, latents: torch.Tensor, latents_scale, latents_bias) -> np.ndarray:
    """Normalised latents -> uint8 [n, H, W, 3] with the official truncating cast
    (docs/numerics.md#saved-samples-are-truncated)."""
    images = vae.decode(denormalize_latents(latents.float(), latents_scale, latents_bias)).sample
    images = (images + 1) / 2.0
    return torch.clamp(255.0 * images, 0, 255).permute(0, 2, 3, 1).to("cpu", dtype=torch.uint8).numpy()


@torch.no_grad()
def generate_on_rank(run: LoadedRun, folder: str, options, rank: int, world_size: int, device) -> List[int]:
    """Sample and save this rank's PNGs; returns the global indices written."""
    model, n = run.model, options.pproc_batch_size
    latent_size = model.x_embedder.input_size
    balanced = (
        class_balanced_labels(options.num_fid_samples, model.num_classes, options.global_seed).to(device)
        if options.class_balanced else None
    )
    torch.manual_seed(rank_seed(options.global_seed, rank, world_size))
    written = []
    iterations = num_iterations(options.num_fid_samples, n, world_size)
    for iteration in tqdm(range(iterations), disable=rank != 0, desc="sampling"):
        z = torch.randn(n, model.in_channels, latent_size, latent_size, device=device)
        y = torch.randint(0, model.num_classes, (n,), device=device)
        indices = global_indices(rank, world_size, n, iteration)
        if balanced is not None:
            in_range = indices < options.num_fid_samples  # padding images keep their random label
            y[in_range.to(device)] = balanced[indices[in_range].to(device)]
        guidance = dict(cfg_scale=options.cfg_scale, guidance_low=options.guidance_low,
                        guidance_high=options.guidance_high, path_type=options.path_type)
        if options.mode == "sde":
            latents = euler_maruyama_sampler(model, z, y, num_steps=options.num_steps, **guidance)
        else:
            latents = euler_sampler(model, z, y, num_steps=options.num_steps, heun=options.heun, **guidance)
        images = decode_to_uint8(run.vae, latents, run.latents_scale, run.latents_bias)
        for index, image in zip(indices.tolist(), images):
            Image.fromarray(image).save(os.path.join(folder, f"{index:06d}.png"))
            written.append(index)
    return written


def create_npz_from_sample_folder(folder: str, num_samples: int) -> str:
    """Stack ``000000.png ... <N-1>.png`` into ``<folder>.npz`` (``arr_0``, uint8 [N, H, W, 3]).

    The ``.npy`` member is streamed into the zip one image at a time (50k images at 256 px are
    9.8 GB: never held in memory) and the file appears atomically (temp file + rename), so an
    interrupted run cannot leave an ``.npz`` that makes the next run skip sampling. The result
    is an ordinary ``np.savez`` archive.
    """
    def read_png(index: int) -> np.ndarray:
        path = os.path.join(folder, f"{index:06d}.png")
        if not os.path.isfile(path):
            raise FileNotFoundError(f"sample {path} is missing: cannot build {folder}.npz")
        return np.asarray(Image.open(path)).astype(np.uint8)

    first = read_png(0)
    if first.ndim != 3 or first.shape[2] != 3:
        raise ValueError(f"{folder}/000000.png is not an RGB image (shape {first.shape})")
    npz_path = f"{folder}.npz"
    header = {"descr": np.lib.format.dtype_to_descr(np.dtype(np.uint8)), "fortran_order": False,
              "shape": (num_samples, *first.shape)}
    handle, temp_path = tempfile.mkstemp(dir=os.path.dirname(os.path.abspath(npz_path)), suffix=".npz.tmp")
    os.close(handle)
    try:
        with zipfile.ZipFile(temp_path, "w", zipfile.ZIP_STORED, allowZip64=True) as archive:
            with archive.open("arr_0.npy", "w", force_zip64=True) as member:
                np.lib.format.write_array_header_1_0(member, header)
                for index in range(num_samples):
                    image = first if index == 0 else read_png(index)
                    if image.shape != first.shape:
                        raise ValueError(f"sample {index:06d}.png has shape {image.shape}, expected {first.shape}")
                    member.write(np.ascontiguousarray(image).tobytes())
        os.replace(temp_path, npz_path)
    finally:
        if os.path.exists(temp_path):
            os.remove(temp_path)
    return npz_path


def sample_source(checkpoint_path: str, options) -> Dict:
    """What made a sample set: the checkpoint file (resolved path, size, modification time) and
    the flags that change the images. Stored beside the ``.npz`` as ``<folder>.source.json``."""
    stat = os.stat(checkpoint_path)
    return {"checkpoint": os.path.realpath(checkpoint_path), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns,
            "sampling": {name: getattr(options, name) for name in SAMPLING_OPTIONS}}


def source_path(folder: str) -> str:
    return f"{folder}.source.json"


def write_sample_source(folder: str, source: Dict) -> None:
    path = source_path(folder)
    with open(path + ".tmp", "w") as handle:
        json.dump(source, handle, indent=1)
    os.replace(path + ".tmp", path)


def reusable_samples_problem(folder: str, source: Dict) -> Optional[str]:
    """None when ``<folder>.npz`` was made from ``source``; else why it may not be reused."""
    npz, recorded_path = f"{folder}.npz", source_path(folder)
    remedy = f"remove {npz} (and {recorded_path}) or choose another --sample-dir"
    try:
        with open(recorded_path) as handle:
            recorded = json.load(handle)
    except (OSError, ValueError):
        return f"{npz} exists but {recorded_path} (which checkpoint and flags made it) is missing or unreadable: {remedy}"
    same_file = recorded.get("checkpoint") == source["checkpoint"] or (
        os.path.exists(str(recorded.get("checkpoint"))) and os.path.samefile(recorded["checkpoint"], source["checkpoint"]))
    if not same_file or (recorded.get("size"), recorded.get("mtime_ns")) != (source["size"], source["mtime_ns"]):
        return (f"{npz} holds samples of {recorded.get('checkpoint')} (size {recorded.get('size')}, mtime_ns "
                f"{recorded.get('mtime_ns')}), not of {source['checkpoint']} (size {source['size']}, mtime_ns "
                f"{source['mtime_ns']}): {remedy}")
    changed = sorted(k for k in source["sampling"] if recorded.get("sampling", {}).get(k) != source["sampling"][k])
    if changed:
        return f"{npz} was sampled with other flags ({', '.join(changed)} differ): {remedy}"
    return None


def check_options(options) -> None:
    """Flag errors, before anything is read from disk."""
    if options.label_sampling == "random" and options.class_balanced:
        raise ValueError("--label-sampling random contradicts --class-balanced")
    if options.label_sampling == "equal":
        options.class_balanced = True
    if bool(options.ckpt) == bool(options.exp_path):
        raise ValueError("give either --ckpt FILE or --exp-path DIR --train-steps N")
    if options.exp_path and options.train_steps is None:
        raise ValueError("--exp-path needs --train-steps (the checkpoint's step)")
    if options.ckpt and options.train_steps is not None:
        raise ValueError("--train-steps goes with --exp-path, not with --ckpt")
    if options.exp_path and options.args_json:
        raise ValueError("--args-json goes with --ckpt (--exp-path reads <exp-path>/args.json)")
    if options.heun and options.mode != "ode":
        raise ValueError("Heun's method is only available for ODE sampling (--mode ode)")
    if options.cfg_scale < 1.0:
        raise ValueError(f"--cfg-scale must be >= 1 (1 = no guidance), got {options.cfg_scale}")
    if not 0.0 <= options.guidance_low <= options.guidance_high <= 1.0:
        raise ValueError("the guidance interval must satisfy 0 <= --guidance-low <= --guidance-high <= 1")
    if options.num_fid_samples < 1 or options.pproc_batch_size < 1 or options.num_steps < 1:
        raise ValueError("--num-fid-samples, --pproc-batch-size and --num-steps must be >= 1")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m repa_e_fast.generate",
        description="Sample images from a trained SiT for FID (official generate.py semantics); "
        "launch with torchrun for several processes.",
    )
    source = parser.add_argument_group("model (one of)")
    source.add_argument("--exp-path", default=None, help="official experiment directory (args.json, checkpoints/)")
    source.add_argument("--train-steps", default=None, help="checkpoint step under --exp-path, e.g. 400000")
    source.add_argument("--ckpt", default=None, help="a training checkpoint file (ema, optional vae, optional args)")
    source.add_argument("--args-json", default=None, help="run arguments for --ckpt when it has no 'args'")
    source.add_argument("--vae-ckpt", default=None,
                        help="VAE for checkpoints without 'vae' (LDM-only runs); default: the run's vae_ckpt")
    sampling = parser.add_argument_group("sampling (official flags and defaults)")
    sampling.add_argument("--mode", default="ode", choices=["ode", "sde"])
    sampling.add_argument("--num-steps", type=int, default=50)
    sampling.add_argument("--cfg-scale", type=float, default=1.5)
    sampling.add_argument("--guidance-low", type=float, default=0.0)
    sampling.add_argument("--guidance-high", type=float, default=1.0)
    sampling.add_argument("--path-type", default="linear", choices=["linear", "cosine"])
    sampling.add_argument("--heun", action=argparse.BooleanOptionalAction, default=False,
                          help="Heun corrector (ODE only)")
    sampling.add_argument("--num-fid-samples", type=int, default=50_000)
    sampling.add_argument("--pproc-batch-size", type=int, default=256, help="images per process per iteration")
    sampling.add_argument("--global-seed", type=int, default=0)
    sampling.add_argument("--class-balanced", action="store_true",
                          help="exactly num_fid_samples / num_classes images per class, shuffled "
                          "(default: uniform random labels, as in the spec's official script)")
    sampling.add_argument("--label-sampling", default=None, choices=["equal", "random"],
                          help="the later official flag: equal = --class-balanced, random = uniform labels")
    output = parser.add_argument_group("output and precision")
    output.add_argument("--sample-dir", default="samples")
    output.add_argument("--tf32", action=argparse.BooleanOptionalAction, default=True,
                        help="TF32 matmuls/convolutions on CUDA (official default: on)")
    return parser


def main(argv=None) -> int:
    options = build_parser().parse_args(argv)
    try:
        check_options(options)
        name = run_name_from_paths(options.ckpt, options.exp_path, options.train_steps)
        folder = sample_folder(options.sample_dir, name, options.cfg_scale, options.guidance_low,
                               options.guidance_high, options.class_balanced)
        checkpoint_path = experiment_paths(options.exp_path, options.train_steps)[0] if options.exp_path \
            else options.ckpt
        if not os.path.isfile(checkpoint_path):
            raise FileNotFoundError(f"checkpoint not found: {checkpoint_path}")
        source = sample_source(checkpoint_path, options)
        if os.path.exists(f"{folder}.npz"):
            # Checked before anything is loaded (the official script loads the model first). A
            # sample set is reused only when the same checkpoint and flags made it.
            problem = reusable_samples_problem(folder, source)
            if problem is not None:
                raise ValueError(problem)
            print(f"Skipping sampling: {folder}.npz already exists (made from {source['checkpoint']}).")
            return 0
        run = load_run(options.ckpt, options.exp_path, options.train_steps, options.args_json, options.vae_ckpt)
        if options.class_balanced:
            class_balanced_labels(options.num_fid_samples, run.model.num_classes, options.global_seed)
        if options.cfg_scale > 1 and run.model.y_embedder.embedding_table.num_embeddings <= run.model.num_classes:
            raise ValueError(
                "--cfg-scale > 1 needs a model trained with label dropout (cfg_prob > 0): it has no null class"
            )
    except (OSError, ValueError) as error:  # CheckpointError is a ValueError
        print(f"error: {error}", file=sys.stderr)
        return 2

    torch.backends.cuda.matmul.allow_tf32 = options.tf32
    torch.backends.cudnn.allow_tf32 = options.tf32
    runtime = setup_runtime()  # torchrun: a process group, one device per rank
    rank, world_size, device = runtime.rank, runtime.world_size, runtime.device
    distributed = dist.is_initialized()
    run.model.to(device)
    run.vae.to(device)
    run.latents_scale, run.latents_bias = run.latents_scale.to(device), run.latents_bias.to(device)
    if rank == 0:
        os.makedirs(folder, exist_ok=True)
        print(f"Saving .png samples at {folder}")
    if distributed:
        dist.barrier()  # the folder exists before any rank writes into it

    seed = rank_seed(options.global_seed, rank, world_size)
    print(f"rank={rank} world_size={world_size} seed={seed} device={device}")
    generate_on_rank(run, folder, options, rank, world_size, device)
    if distributed:
        dist.barrier()  # every PNG is on disk before rank 0 reads them back
    if rank == 0:
        write_sample_source(folder, source)  # before the .npz: an .npz never appears without it
        npz_path = create_npz_from_sample_folder(folder, options.num_fid_samples)
        print(f"Saved {npz_path} [{options.num_fid_samples} images]")
    if distributed:
        dist.barrier()
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
