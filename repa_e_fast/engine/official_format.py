"""What a training checkpoint holds, and reading it back (``engine/checkpoint.py`` owns the
files: atomic write, manifest, retention, lock).

A checkpoint folder holds ``official.pt`` in the official single-file format (``model``,
``ema``, ``vae``, ``discriminator``, ``opt``, ``opt_vae``, ``opt_disc``, ``args``, ``steps``),
``trainer.pt`` (what an exact resume needs beyond it: progress counters, the loader position,
the loss module's LeCam buffers, the backend's counters, the config), ``rng/rank<r>.pt`` and,
DeepSpeed runs only, ``deepspeed/`` (the engines' own checkpoint). Optimizer states come from
every backend through ``optimizer_state_dicts()`` in torch's AdamW layout.

Here too: choosing and checking a resume (which config changes a resume may make), starting
from an official checkpoint (``--init-from``), and reading one entry of a checkpoint file for
``generate`` and ``extract_vae``.
"""

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Optional

import torch

from ..config import ConfigError, TrainConfig, with_renamed_keys
from ..models.checkpoints import (CheckpointError, load_state_dict_strict, read_checkpoint_file, safe_torch_load,
                                  strip_wrapper_prefixes)
from ..models.vae import AutoencoderKL, build_vae
from .backends import TrainingBackend
from .checkpoint import (CheckpointManager, NoGoodCheckpoint, rng_state, set_rng_state,
                         unverified_checkpoints_report, verify_checkpoint, verify_enclosing_checkpoint)
from .runtime import Runtime, log

# What a resume may change. Applied with a notice: how the run is driven from now on.
RESUME_APPLIED = ("learning_rate", "vae_learning_rate", "disc_learning_rate", "log_every", "report_to",
                  "wandb_project", "checkpointing_steps", "keep_last_checkpoints", "sampling_steps",
                  "sample_grid_size", "sample_num_steps", "sample_cfg_scale", "max_train_steps", "epochs",
                  "max_consecutive_faults")
# Accepted silently: where files are (a run moved to another cluster) and speed switches that
# compute the same thing. Every other field defines the run: a change is refused.
RESUME_FREE = ("output_dir", "exp_name", "resume", "resume_step", "init_from", "overwrite",
               "data_dir", "latents_path", "pretrained_dir", "vae_ckpt", "encoder_ckpts", "lpips_vgg16_ckpt",
               "lpips_lin_ckpt", "disc_pretrained_ckpt", "loss_cfg_path", "deepspeed_config", "num_workers",
               "data_loader", "device", "distributed", "fused_ops", "fused_attn", "attention", "channels_last",
               "compile", "allow_tf32", "allow_random_encoder", "allow_random_lpips", "grad_checkpointing",
               "continue_train_exp_dir", "logging_dir", "wandb_history_path", "vae_latents_name")


@dataclass
class Progress:
    step: int = 0  # completed optimizer steps
    skipped_steps: int = 0
    consecutive_faults: int = 0
    images_seen: int = 0
    wandb_run_id: Optional[str] = None  # a resumed run continues the same W&B run


# ---------------------------------------------------------------------------------------
# Writing
# ---------------------------------------------------------------------------------------
def official_payload(config: TrainConfig, models, backend: TrainingBackend, progress: Progress) -> dict:
    """``official.pt``'s contents. Collective under ZeRO (the optimizer states are gathered)."""
    payload = {"model": backend.unwrap("sit").state_dict(), "ema": models["ema"].state_dict()}
    if config.train_mode == "repae":
        payload.update(vae=backend.unwrap("vae").state_dict(),
                       discriminator=backend.unwrap("vae_loss").discriminator.state_dict())
    payload.update(args=config.official_args(), steps=progress.step)
    optimizers = backend.optimizer_state_dicts()
    payload["opt"] = optimizers["sit"]
    if config.train_mode == "repae":
        payload.update(opt_vae=optimizers["vae"], opt_disc=optimizers["vae_loss"])
    return payload


def save_checkpoint(manager: CheckpointManager, config: TrainConfig, runtime: Runtime, models,
                    backend: TrainingBackend, loader, progress: Progress) -> Path:
    """Collective: every rank calls it; rank 0 writes official.pt and trainer.pt."""
    deepspeed = runtime.distributed == "deepspeed"  # its engines keep their counters in deepspeed/

    def write(directory: Path) -> None:
        if deepspeed:
            (directory / "deepspeed").mkdir(exist_ok=True)
            backend.save_checkpoint(directory / "deepspeed")
        payload = official_payload(config, models, backend, progress)
        if runtime.is_main:
            torch.save(payload, directory / "official.pt")
            loss_state = {} if config.train_mode == "ldm" else {
                k: v for k, v in backend.unwrap("vae_loss").state_dict().items()
                if not k.startswith(("perceptual_loss.", "discriminator."))}
            torch.save({"format": 1, "progress": vars(progress), "loader": loader.state_dict(),
                        "loss_module": loss_state, "backend": {} if deepspeed else backend.state_dict(),
                        "config": config.to_dict(), "world_size": runtime.world_size}, directory / "trainer.pt")
        (directory / "rng").mkdir(exist_ok=True)
        torch.save(rng_state(), directory / "rng" / f"rank{runtime.rank:05d}.pt")

    return manager.save(progress.step, write)


# ---------------------------------------------------------------------------------------
# Resuming
# ---------------------------------------------------------------------------------------
def choose_resume(config: TrainConfig, manager: CheckpointManager) -> Optional[Path]:
    if config.resume_step and not config.resume:
        return manager.path(config.resume_step)
    if not config.resume:
        return None
    if config.resume == "auto":
        found = manager.latest_good()
        if found is None and manager.complete_checkpoints():
            # Never a silent restart from step 0 over checkpoints that may be repairable.
            raise NoGoodCheckpoint(f"--resume auto: no checkpoint under {manager.root} verifies: "
                                   f"{unverified_checkpoints_report(manager)}; repair or move them away "
                                   f"(or start over with --overwrite)")
        return found  # None: a fresh start
    path = Path(config.resume)
    problem = verify_checkpoint(path)
    if problem:
        raise NoGoodCheckpoint(f"cannot resume from {path}: {problem}")
    return path


@dataclass
class ResumeState:
    path: Path
    official: dict
    trainer: dict
    rng: dict


def read_resume_state(path: Path, runtime: Runtime) -> ResumeState:
    """Verify and read a checkpoint (no code in it can run), before any model is built."""
    problem = verify_checkpoint(path)
    if problem:
        raise NoGoodCheckpoint(f"cannot resume from {path}: {problem}")
    official = safe_torch_load(path / "official.pt")
    trainer = safe_torch_load(path / "trainer.pt")
    rng_file = path / "rng" / f"rank{runtime.rank:05d}.pt"
    rng = safe_torch_load(rng_file) if rng_file.is_file() else None
    return ResumeState(path, official, trainer, rng)


def check_resumed_config(config: TrainConfig, resumed: ResumeState, runtime: Runtime) -> None:
    """Refuse a resume that changes what the run computes (one line naming every change);
    log the changes that are applied (learning rates, logging, cadence)."""
    saved, new = with_renamed_keys(resumed.trainer.get("config", {})), config.to_dict()
    changed = {k: (saved[k], v) for k, v in new.items() if k in saved and saved[k] != v}
    refused = [f"{k} {old!r} -> {value!r}" for k, (old, value) in changed.items()
               if k not in RESUME_APPLIED and k not in RESUME_FREE]
    if resumed.trainer.get("world_size", runtime.world_size) != runtime.world_size:
        refused.append(f"world_size {resumed.trainer['world_size']} -> {runtime.world_size}")
    saved_deepspeed = (resumed.path / "deepspeed").is_dir()
    if saved_deepspeed != (runtime.distributed == "deepspeed"):
        refused.append(f"distributed {'deepspeed' if saved_deepspeed else 'single/ddp'} -> {runtime.distributed}")
    if refused:
        raise ConfigError(f"cannot resume {resumed.path} with a changed {'; '.join(refused)} (these define the "
                          f"run: resume without changing them, or start a new run)")
    for key in RESUME_APPLIED:
        if key in changed:
            log(runtime, f"resume: {key} changed {changed[key][0]!r} -> {changed[key][1]!r}; the new value applies")


def load_checkpoint(resumed: ResumeState, config: TrainConfig, runtime: Runtime, models,
                    backend: TrainingBackend, loader) -> Progress:
    path, official, trainer = resumed.path, resumed.official, resumed.trainer
    load_state_dict_strict(backend.unwrap("sit"), official["model"], f"SiT from {path}")
    load_state_dict_strict(models["ema"], official["ema"], f"EMA from {path}")
    names = {"sit": "opt"}
    if config.train_mode == "repae":
        load_state_dict_strict(backend.unwrap("vae"), official["vae"], f"VAE from {path}")
        load_state_dict_strict(backend.unwrap("vae_loss").discriminator, official["discriminator"],
                               f"discriminator from {path}")
        backend.unwrap("vae_loss").load_state_dict(trainer["loss_module"], strict=False)
        names.update(vae="opt_vae", vae_loss="opt_disc")
    if runtime.distributed == "deepspeed":
        backend.load_checkpoint(path / "deepspeed")
    else:
        backend.load_optimizer_state_dicts({k: official[v] for k, v in names.items()})
        backend.load_state_dict(trainer["backend"])
    # A resumed optimizer state carries the old run's learning rates: the configured ones apply.
    backend.set_learning_rates(config.learning_rates())
    loader.load_state_dict(trainer["loader"])
    if resumed.rng is None:
        raise NoGoodCheckpoint(f"cannot resume from {path}: no RNG state for rank {runtime.rank}")
    set_rng_state(resumed.rng)
    return Progress(**trainer["progress"])


def init_from_official(path: str, config: TrainConfig, runtime: Runtime, models,
                       backend: TrainingBackend) -> Progress:
    """Start from an official single-file checkpoint: the weights the run trains, the Adam
    states when present (under DeepSpeed, into ZeRO's partitions) and the step. An LDM-only
    run reads only the SiT's entries: official LDM-only checkpoints have no vae/discriminator."""
    verify_enclosing_checkpoint(path)  # a file of one of our checkpoints is used only when it verifies
    full = safe_torch_load(path, mmap=True)  # the allow-list covers the official "args"
    # model name -> (weights entry, optimizer entry, module to load)
    parts = {"sit": ("model", "opt", backend.unwrap("sit"))}
    if config.train_mode == "repae":
        parts.update(vae=("vae", "opt_vae", backend.unwrap("vae")),
                     vae_loss=("discriminator", "opt_disc", backend.unwrap("vae_loss").discriminator))
    missing = [key for key in ["ema"] + [weights for weights, _, _ in parts.values()] if key not in full]
    if missing:
        hint = " (an LDM-only checkpoint starts only --train-mode ldm)" if "vae" in missing else ""
        raise ConfigError(f"--init-from {path} has no {missing} entries{hint}; it has {sorted(full)}")
    for name, (weights, _, module) in parts.items():
        load_state_dict_strict(module, strip_wrapper_prefixes(full[weights]), f"{name} from {path}")
    load_state_dict_strict(models["ema"], strip_wrapper_prefixes(full["ema"]), f"EMA from {path}")
    optimizers = {name: full[opt] for name, (_, opt, _) in parts.items() if opt in full}
    if len(optimizers) < len(parts):
        log(runtime, f"{path}: optimizer states not loaded (absent); Adam restarts")
    else:
        backend.load_optimizer_state_dicts(optimizers)
    return Progress(step=int(full.get("steps", 0)))


# ---------------------------------------------------------------------------------------
# Reading one checkpoint file (generate, extract_vae)
# ---------------------------------------------------------------------------------------
def read_checkpoint(path: str) -> Dict:
    """An official training checkpoint (dict with ``ema``, ``vae``, ``args`` ...), memory-mapped
    so optimiser states that are never touched are never read."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint not found: {path}")
    verify_enclosing_checkpoint(path)
    checkpoint = read_checkpoint_file(path, mmap=True)  # the allow-list covers the official "args"
    if not isinstance(checkpoint, dict):
        raise CheckpointError(f"{path} holds a {type(checkpoint).__name__}, expected a training-checkpoint dict")
    return checkpoint


def checkpoint_entry(checkpoint: Dict, key: str, path: str, why: str) -> Dict[str, torch.Tensor]:
    """``checkpoint[key]`` as a state dict (wrapper prefixes stripped), or a one-line error."""
    if key not in checkpoint:
        raise CheckpointError(f"{path} has no {key!r} entry ({why}); it has {sorted(checkpoint)}")
    entry = checkpoint[key]
    if not isinstance(entry, dict) or not all(isinstance(v, torch.Tensor) for v in entry.values()):
        raise CheckpointError(f"{path}[{key!r}] is not a state dict of tensors")
    return strip_wrapper_prefixes(entry)


def load_vae(layout: str, state_dict: Dict[str, torch.Tensor], source: str) -> AutoencoderKL:
    """Strict load; the base width ``ch`` (128 in every published VAE) is read from the weights."""
    if "encoder.conv_in.weight" not in state_dict:
        raise CheckpointError(f"{source} is not an AutoencoderKL state dict (no 'encoder.conv_in.weight')")
    vae = build_vae(layout, ch=int(state_dict["encoder.conv_in.weight"].shape[0]))
    load_state_dict_strict(vae, state_dict, f"{layout} VAE (from {source})")
    return vae.eval()
