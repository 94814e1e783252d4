"""REPA-E training: ``deepspeed repa_e_fast/train.py``, ``torchrun ... repa_e_fast/train.py``
or ``python -m repa_e_fast.train`` with ``--config configs/<setup>.yaml`` and the official
flags (see ``config.py``).

The loop is the official one (spec §2): one REPA-E step per batch (``engine/step.py``), EMA,
logging of the official values, periodic sample grids and checkpoints. Around it, what a
long run on a shared cluster needs: checks before anything expensive, exact resume
(``--resume auto``), atomic checkpoints, SIGTERM/SIGINT/SIGUSR1 (or the launcher's death) ->
checkpoint, ``<run>/PREEMPTED`` and exit 75, and non-finite steps skipped then, after
``max_consecutive_faults`` in a row, exit 65. Every file is loaded without running code from
it (``safe_torch_load``); one trainer per run folder (``RunLock``).
"""

import copy
import ctypes
import json
import math
import os
import signal
import sys
import time
import warnings
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Dict, Optional

if __package__ in (None, ""):
    # Run as a script (deepspeed/torchrun launch a file): import the package, not siblings.
    _here = os.path.dirname(os.path.abspath(__file__))
    sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != _here]
    sys.path.insert(0, os.path.dirname(_here))

import torch
import torch.distributed as dist

from repa_e_fast.config import ConfigError, TrainConfig, parse_config, validate_files, validate_world
from repa_e_fast.engine.backends import DDPBackend, SingleProcessBackend, build_adamw
from repa_e_fast.engine.checkpoint import (CheckpointManager, CheckpointWriteError, NoGoodCheckpoint, RunFolderError,
                                          RunLock, check_writable, proc_stat_field, rng_state, set_rng_state,
                                          unverified_checkpoints_report, verify_checkpoint,
                                          verify_enclosing_checkpoint)
from repa_e_fast.engine.ema import update_ema
from repa_e_fast.engine.peers import watch_peers
from repa_e_fast.engine.reporting import (MetricsLogger, plot_loss_curves, read_metrics, save_image_grid,
                                          save_sample_sheet)
from repa_e_fast.engine.step import LDMStep, REPAEStep, StepConfig
from repa_e_fast.engine.sync_batchnorm import convert_to_global_batchnorm
from repa_e_fast.models.checkpoints import safe_torch_load

EXIT_OK = 0
EXIT_ERROR = 2  # bad configuration, data or checkpoint: nothing was trained
EXIT_FAULTS = 65  # too many consecutive non-finite steps; the last good checkpoint is intact
EXIT_PREEMPTED = 75  # SIGTERM/SIGINT/SIGUSR1 or launcher gone: a checkpoint was written; rerun with --resume auto
PREEMPTED_MARKER = "PREEMPTED"  # <run>/PREEMPTED: {"step": ..., "reason": ...}; a job script requeues on it

# What a resume may change. Applied with a notice: how the run is driven from now on.
RESUME_APPLIED = ("learning_rate", "vae_learning_rate", "disc_learning_rate", "log_every", "report_to",
                  "wandb_project", "checkpointing_steps", "keep_last_checkpoints", "sampling_steps",
                  "sample_grid_size", "sample_num_steps", "sample_cfg_scale", "max_train_steps", "epochs",
                  "max_consecutive_faults")
# Accepted silently: where files are (a run moved to another cluster) and speed switches that
# compute the same thing. Every other field defines the run: a change is refused.
RESUME_FREE = ("output_dir", "exp_name", "resume", "resume_step", "init_from", "overwrite", "fault_injection",
               "data_dir", "latents_path", "pretrained_dir", "vae_ckpt", "encoder_ckpts", "lpips_vgg16_ckpt",
               "lpips_lin_ckpt", "disc_pretrained_ckpt", "loss_cfg_path", "deepspeed_config", "num_workers",
               "data_backend", "device", "backend", "fused_ops", "fused_attn", "attn_backend", "channels_last",
               "compile", "allow_tf32", "allow_random_encoder", "allow_random_lpips", "grad_checkpointing",
               "continue_train_exp_dir", "logging_dir", "wandb_history_path", "vae_latents_name")

LOGGED_CURVES = ("sit_loss", "denoising_loss", "proj_loss", "vae_loss", "vae_align_loss", "d_loss")


class TrainingAborted(RuntimeError):
    pass


@dataclass
class Runtime:
    backend: str
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


_log_file = None  # <experiment>/log.txt on rank 0, opened by train(): what stdout shows


def log(runtime: Runtime, message: str) -> None:
    if runtime.is_main:
        print(f"[repa_e_fast] {message}", flush=True)
        if _log_file is not None:
            _log_file.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} [repa_e_fast] {message}\n")
            _log_file.flush()


# ---------------------------------------------------------------------------------------
# Set-up
# ---------------------------------------------------------------------------------------
def setup_runtime(config: TrainConfig, launcher_local_rank: Optional[int]) -> Runtime:
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    backend = config.backend
    if backend == "auto":
        backend = "deepspeed" if launcher_local_rank is not None else ("ddp" if world_size > 1 else "single")
    if backend == "single" and world_size > 1:
        raise ConfigError(f"backend single cannot run {world_size} processes; use ddp (torchrun) or deepspeed")
    local_rank = int(os.environ.get("LOCAL_RANK", launcher_local_rank or 0))
    if config.device:
        device = torch.device(config.device)
    elif torch.cuda.is_available():
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = config.allow_tf32
        torch.backends.cudnn.allow_tf32 = config.allow_tf32
        # Fixed shapes every step (VAE, LPIPS, discriminator convolutions): let cuDNN pick
        # the fastest algorithm once. Same numerics class as TF32 on/off: cuDNN's choice.
        torch.backends.cudnn.benchmark = True
    comm = "nccl" if device.type == "cuda" else "gloo"
    if backend == "deepspeed":
        for key, value in (("RANK", "0"), ("LOCAL_RANK", str(local_rank)), ("WORLD_SIZE", "1"),
                           ("MASTER_ADDR", "127.0.0.1"), ("MASTER_PORT", "29511")):
            os.environ.setdefault(key, value)
        try:
            import deepspeed
        except ImportError:
            raise ConfigError("backend deepspeed needs DeepSpeed: pip install 'repa_e_fast[deepspeed]'") from None
        if device.type == "cpu":
            # DeepSpeed's CPU accelerator JIT-compiles a shared-memory all-reduce meant for
            # inference (~100 s on 2 cores) when communication starts; training never uses it.
            import deepspeed.ops

            deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
        deepspeed.init_distributed(dist_backend=comm, timeout=timedelta(seconds=config.dist_timeout))
    elif backend == "ddp":
        dist.init_process_group(comm, timeout=timedelta(seconds=config.dist_timeout))
    rank = dist.get_rank() if dist.is_initialized() else 0
    world_size = dist.get_world_size() if dist.is_initialized() else 1
    return Runtime(backend, rank, world_size, local_rank, device)


def seed_everything(seed: int) -> None:
    import random

    import numpy as np

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def build_loader(config: TrainConfig, runtime: Runtime, micro_batch: int):
    from repa_e_fast.data import build_image_loader, ensure_demo_dataset

    path = ensure_demo_dataset() if config.demo_dataset else config.data_dir
    loader = build_image_loader(path, micro_batch, resolution=config.resolution, rank=runtime.rank,
                                world_size=runtime.world_size, seed=config.seed, device=runtime.device,
                                backend=config.data_backend, num_workers=config.num_workers, shuffle=True,
                                drop_last=True, hflip=config.hflip)
    if loader.num_classes > config.num_classes:
        raise ConfigError(f"the dataset at {path} has {loader.num_classes} classes but num_classes is "
                          f"{config.num_classes}")
    if len(loader) == 0:
        raise ConfigError(f"the dataset at {path} has {loader.num_images} images: fewer than one global batch "
                          f"of {config.batch_size // config.gradient_accumulation_steps}")
    return loader


def build_models(config: TrainConfig, runtime: Runtime) -> Dict[str, torch.nn.Module]:
    from repa_e_fast.losses.vae_loss import VAELossConfig, VAERegularizationLoss
    from repa_e_fast.models.checkpoints import load_latents_stats, load_weights
    from repa_e_fast.models.encoders import load_encoders
    from repa_e_fast.models.lpips import LPIPS
    from repa_e_fast.models.sit import SiT
    from repa_e_fast.models.vae import build_vae

    device = runtime.device
    with warnings.catch_warnings():
        if not runtime.is_main:
            warnings.simplefilter("ignore")
        encoders = load_encoders(config.enc_type, config.resolution, config.encoder_ckpts, config.pretrained_dir,
                                 allow_random=config.allow_random_encoder, device=device)
    sit = SiT(**config.sit_kwargs(), z_dims=[e.embed_dim for e in encoders])
    ema = copy.deepcopy(sit).requires_grad_(False)  # taken before the BN initialisation (spec §2.1 step 5)

    vae = build_vae(config.vae, ch=config.vae_ch, fused_ops=config.fused_ops)
    ldm = config.train_mode == "ldm"
    if config.grad_checkpointing:  # after the EMA copy: only the trained models recompute
        from repa_e_fast.models.checkpointing import enable_grad_checkpointing

        enable_grad_checkpointing([t.strip() for t in config.grad_checkpointing.split(",") if t.strip()],
                                  sit=sit, vae=None if ldm else vae)
    if config.vae_ckpt:
        load_weights(vae, config.vae_ckpt, name=f"VAE {config.vae}")
        stats = load_latents_stats(config.latents_stats_path())
        sit.init_bn(stats["latents_scale"], stats["latents_bias"])
    elif runtime.is_main:
        warnings.warn("vae_ckpt is null: a RANDOM VAE with identity latent statistics")
    if ldm:
        # LDM-only (spec §9.1): frozen VAE (sample grids only), BN fixed, pos_embed frozen.
        update_ema(ema, sit, decay=0.0)
        vae.eval().requires_grad_(False)
        sit.to(device)
        return {"encoders": encoders, "ema": ema.to(device), "sit": sit, "vae": vae.to(device)}

    if config.loss_cfg_path:
        import yaml

        with open(config.loss_cfg_path) as handle:
            loss_config = VAELossConfig.from_official(yaml.safe_load(handle))
    else:
        loss_config = VAELossConfig()
    loss_fn = VAERegularizationLoss(loss_config).set_fused_ops(config.fused_ops)  # fast LPIPS with the fused ops
    if os.path.isfile(config.lpips_vgg16_ckpt) and os.path.isfile(config.lpips_lin_ckpt):
        loss_fn.perceptual_loss.lpips.load_state_dict(
            LPIPS.from_files(config.lpips_vgg16_ckpt, config.lpips_lin_ckpt).state_dict())
    elif config.allow_random_lpips:
        if runtime.is_main:
            warnings.warn("\n" + "!" * 88 + f"\n!! LPIPS weights not found ({config.lpips_vgg16_ckpt}, "
                          f"{config.lpips_lin_ckpt}): the perceptual loss uses RANDOM weights (demo only).\n"
                          + "!" * 88)
    loss_fn.perceptual_loss.requires_grad_(False)
    if config.disc_pretrained_ckpt:
        load_weights(loss_fn.discriminator, config.disc_pretrained_ckpt, name="discriminator")

    sit.pos_embed.requires_grad_(True)  # trained in REPA-E (R7); before any wrapper registers parameters
    if runtime.world_size > 1:
        convert_to_global_batchnorm(sit)  # SyncBN on the latents, as the official multi-GPU run
        if config.sync_discriminator_bn:
            convert_to_global_batchnorm(loss_fn.discriminator)
    update_ema(ema, sit, decay=0.0)  # exact copy, BN statistics included (step 13)
    models = {"sit": sit, "vae": vae, "disc": loss_fn}
    for name, module in models.items():
        module.to(device)
    ema.to(device)
    if config.channels_last and device.type == "cuda":
        # The loss module's LPIPS and discriminator convolve the VAE's (then channels_last)
        # output: in the same layout cuDNN runs NHWC throughout, with no transposes.
        vae.to(memory_format=torch.channels_last)
        loss_fn.to(memory_format=torch.channels_last)
    if config.compile:
        # In place, so state-dict keys stay the official ones and the step's frozen calls
        # (the SiT's align pass through functional_call) run the compiled module too.
        for module in list(models.values()) + list(encoders):
            module.compile()
    return {"encoders": encoders, "ema": ema, **models}


def build_backend(config: TrainConfig, runtime: Runtime, models: Dict[str, torch.nn.Module], micro_batch: int):
    trainable = {k: models[k] for k in (("sit",) if config.train_mode == "ldm" else ("sit", "vae", "disc"))}
    lrs = {"sit": config.learning_rate, "vae": config.vae_learning_rate, "disc": config.disc_learning_rate}
    adam = dict(betas=(config.adam_beta1, config.adam_beta2), eps=config.adam_epsilon,
                weight_decay=config.adam_weight_decay)
    if runtime.backend == "deepspeed":
        from repa_e_fast.engine.backend_deepspeed import DeepSpeedBackend, load_deepspeed_config

        default_template = {"bf16": "zero2_bf16.json", "fp16": "zero2_fp16.json", "fp32": "zero0_fp32.json"}
        template = config.deepspeed_config or str(Path(__file__).resolve().parent.parent / "configs" / "deepspeed"
                                                  / default_template[config.precision])
        ds_config = load_deepspeed_config(template, precision=config.precision, micro_batch_size=micro_batch,
                                          gradient_accumulation_steps=config.gradient_accumulation_steps,
                                          max_grad_norm=config.max_grad_norm, world_size=runtime.world_size)
        if config.zero_stage is not None:
            ds_config.setdefault("zero_optimization", {})["stage"] = config.zero_stage
        return DeepSpeedBackend(trainable, {k: dict(lr=lrs[k], **adam) for k in trainable}, ds_config,
                                precision=config.precision,
                                gradient_accumulation_steps=config.gradient_accumulation_steps,
                                micro_batch_size=micro_batch, max_grad_norm=config.max_grad_norm,
                                device=runtime.device)
    fused = runtime.device.type == "cuda"
    optimizers = {k: build_adamw(m, lrs[k], fused=fused, **adam) for k, m in trainable.items()}
    cls = DDPBackend if runtime.backend == "ddp" else SingleProcessBackend
    return cls(trainable, optimizers, config.precision, config.gradient_accumulation_steps, runtime.device)


# ---------------------------------------------------------------------------------------
# Checkpoints
# ---------------------------------------------------------------------------------------
@dataclass
class Progress:
    step: int = 0  # completed optimizer steps
    skipped_steps: int = 0
    consecutive_faults: int = 0
    images_seen: int = 0
    wandb_run_id: Optional[str] = None  # a resumed run continues the same W&B run


def official_payload(config, models, backend, progress: Progress, with_optimizers=True) -> dict:
    payload = {"model": backend.unwrap("sit").state_dict(), "ema": models["ema"].state_dict()}
    if config.train_mode == "repae":
        payload.update(vae=backend.unwrap("vae").state_dict(),
                       discriminator=backend.unwrap("disc").discriminator.state_dict())
    payload.update(args=config.official_args(), steps=progress.step)
    optimizers = None
    if isinstance(backend, SingleProcessBackend):
        optimizers = {k: o.state_dict() for k, o in backend.optimizers.items()}
    elif with_optimizers:
        optimizers = backend.full_optimizer_state_dicts()
    if optimizers is not None:
        payload["opt"] = optimizers["sit"]
        if config.train_mode == "repae":
            payload.update(opt_vae=optimizers["vae"], opt_disc=optimizers["disc"])
    return payload


def save_checkpoint(manager: CheckpointManager, config, runtime, models, backend, loader, progress) -> Path:
    def write(directory: Path) -> None:
        if runtime.backend == "deepspeed":
            (directory / "deepspeed").mkdir(exist_ok=True)
            backend.save_checkpoint(directory / "deepspeed")
        payload = official_payload(config, models, backend, progress)  # collective under ZeRO
        if runtime.is_main:
            torch.save(payload, directory / "official.pt")
            loss_state = {} if config.train_mode == "ldm" else {
                k: v for k, v in backend.unwrap("disc").state_dict().items()
                if not k.startswith(("perceptual_loss.", "discriminator."))}
            backend_state = {k: v for k, v in backend.state_dict().items() if k != "optimizers"} \
                if isinstance(backend, SingleProcessBackend) else {}
            torch.save({"format": 1, "progress": vars(progress), "loader": loader.state_dict(),
                        "loss_module": loss_state, "backend": backend_state, "config": config.to_dict(),
                        "world_size": runtime.world_size}, directory / "trainer.pt")
        (directory / "rng").mkdir(exist_ok=True)
        torch.save(rng_state(), directory / "rng" / f"rank{runtime.rank:05d}.pt")

    return manager.save(progress.step, write)


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
    saved, new = resumed.trainer.get("config", {}), config.to_dict()
    changed = {k: (saved[k], v) for k, v in new.items() if k in saved and saved[k] != v}
    refused = [f"{k} {old!r} -> {value!r}" for k, (old, value) in changed.items()
               if k not in RESUME_APPLIED and k not in RESUME_FREE]
    if resumed.trainer.get("world_size", runtime.world_size) != runtime.world_size:
        refused.append(f"world_size {resumed.trainer['world_size']} -> {runtime.world_size}")
    saved_deepspeed = (resumed.path / "deepspeed").is_dir()
    if saved_deepspeed != (runtime.backend == "deepspeed"):
        refused.append(f"backend {'deepspeed' if saved_deepspeed else 'single/ddp'} -> {runtime.backend}")
    if refused:
        raise ConfigError(f"cannot resume {resumed.path} with a changed {'; '.join(refused)} (these define the "
                          f"run: resume without changing them, or start a new run)")
    for key in RESUME_APPLIED:
        if key in changed:
            log(runtime, f"resume: {key} changed {changed[key][0]!r} -> {changed[key][1]!r}; the new value applies")


def set_learning_rates(config: TrainConfig, backend) -> None:
    """Put the configured learning rates into every optimizer param group (a resumed
    optimizer state carries the old run's)."""
    lrs = {"sit": config.learning_rate, "vae": config.vae_learning_rate, "disc": config.disc_learning_rate}
    if isinstance(backend, SingleProcessBackend):
        optimizers = backend.optimizers
    else:  # DeepSpeed engines; a ZeRO optimizer exposes its base optimizer's param groups
        optimizers = {name: engine.optimizer for name, engine in backend.models.items()}
    for name, optimizer in optimizers.items():
        for group in optimizer.param_groups:
            group["lr"] = lrs[name]


def load_checkpoint(resumed: ResumeState, config, runtime, models, backend, loader) -> Progress:
    from repa_e_fast.models.checkpoints import load_state_dict_strict

    path, official, trainer = resumed.path, resumed.official, resumed.trainer
    load_state_dict_strict(backend.unwrap("sit"), official["model"], f"SiT from {path}")
    load_state_dict_strict(models["ema"], official["ema"], f"EMA from {path}")
    names = {"sit": "opt"}
    if config.train_mode == "repae":
        load_state_dict_strict(backend.unwrap("vae"), official["vae"], f"VAE from {path}")
        load_state_dict_strict(backend.unwrap("disc").discriminator, official["discriminator"],
                               f"discriminator from {path}")
        backend.unwrap("disc").load_state_dict(trainer["loss_module"], strict=False)
        names.update(vae="opt_vae", disc="opt_disc")
    if runtime.backend == "deepspeed":
        backend.load_checkpoint(path / "deepspeed")
    else:
        backend.load_state_dict({"optimizers": {k: official[v] for k, v in names.items()}, **trainer["backend"]})
    set_learning_rates(config, backend)
    loader.load_state_dict(trainer["loader"])
    if resumed.rng is None:
        raise NoGoodCheckpoint(f"cannot resume from {path}: no RNG state for rank {runtime.rank}")
    set_rng_state(resumed.rng)
    return Progress(**trainer["progress"])


def init_from_official(path: str, config, runtime, models, backend) -> Progress:
    """Start from an official single-file checkpoint: the weights the run trains, the Adam
    states when present (under DeepSpeed, into ZeRO's partitions) and the step. An LDM-only
    run reads only the SiT's entries: official LDM-only checkpoints have no vae/discriminator."""
    from repa_e_fast.models.checkpoints import load_state_dict_strict, strip_wrapper_prefixes

    verify_enclosing_checkpoint(path)  # a file of one of our checkpoints is used only when it verifies
    full = safe_torch_load(path, mmap=True)  # the allow-list covers the official "args"
    # model name -> (weights entry, optimizer entry, module to load)
    parts = {"sit": ("model", "opt", backend.unwrap("sit"))}
    if config.train_mode == "repae":
        parts.update(vae=("vae", "opt_vae", backend.unwrap("vae")),
                     disc=("discriminator", "opt_disc", backend.unwrap("disc").discriminator))
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
    elif runtime.backend == "deepspeed":
        backend.load_full_optimizer_state_dicts(optimizers)
    else:
        backend.load_state_dict({"optimizers": optimizers})
    return Progress(step=int(full.get("steps", 0)))


# ---------------------------------------------------------------------------------------
# Sampling for the periodic grids
# ---------------------------------------------------------------------------------------
@torch.no_grad()
def sample_grid(config: TrainConfig, runtime: Runtime, models, backend, step: int, directory: Path,
                real_images: Optional[torch.Tensor] = None) -> Path:
    """EMA samples, fixed noise and labels (a private generator: the training RNG streams are
    untouched, so sampling never changes the run). With ``real_images`` (uint8, a training
    batch), the readable sheet also shows their VAE reconstructions."""
    from repa_e_fast.sampling import denormalize_latents, euler_sampler

    ema, vae = models["ema"], models["vae"]
    count = config.sample_grid_size
    generator = torch.Generator().manual_seed(config.seed)
    noise = torch.randn(count, config.latent_channels, config.latent_size, config.latent_size, generator=generator)
    labels = torch.arange(count) % config.num_classes
    was_training = vae.training
    ema.eval()
    vae.eval()
    latents = euler_sampler(ema, noise.to(runtime.device), labels.to(runtime.device),
                            num_steps=config.sample_num_steps, cfg_scale=config.sample_cfg_scale,
                            path_type=config.path_type)
    stats = ema.extract_latents_stats()
    z = denormalize_latents(latents.float(), stats["latents_scale"], stats["latents_bias"])
    images = vae.decode(z).sample
    reconstructions = None
    if real_images is not None:
        real = real_images[:8].to(runtime.device)
        decoded = vae.decode(vae.encode(real.float() / 127.5 - 1).mean).sample
        reconstructions = (real.cpu(), torch.clamp(255 * (decoded + 1) / 2, 0, 255).to(torch.uint8).cpu())
    vae.train(was_training)
    images = torch.clamp(255 * (images + 1) / 2, 0, 255).to(torch.uint8)  # official truncating cast
    # Labels cycle through the classes, so with a multiple of num_classes each column is one class.
    columns = config.num_classes if count % config.num_classes == 0 and config.num_classes <= 16 else None
    grid = save_image_grid(images, directory / f"samples_{step:07d}.png", columns=columns)
    # The same samples upscaled and labelled by class, for a person to look at.
    save_sample_sheet(images, directory / f"samples_{step:07d}_sheet.png", labels=labels.tolist(), columns=columns,
                      title=f"EMA samples, step {step}", reconstructions=reconstructions)
    return grid


def write_optional(runtime: Runtime, what: str, write) -> Optional[Path]:
    """Sample grids and the loss plot are optional: a full or read-only disk there is a
    warning and training goes on (checkpoints have their own error path: exit 2, the
    previous checkpoint intact)."""
    try:
        return write()
    except OSError as error:
        log(runtime, f"warning: could not write the {what} ({error.strerror or error}); training continues")
        return None


def write_preempted_marker(experiment: Path, step: int, reason: str) -> None:
    """``<run>/PREEMPTED``: a job script requeues the job when it exists (the launchers do not
    pass exit code 75 through). Written atomically; removed when a run starts."""
    marker = experiment / PREEMPTED_MARKER
    tmp = marker.with_name(PREEMPTED_MARKER + ".tmp")
    tmp.write_text(json.dumps({"step": step, "reason": reason}) + "\n")
    os.replace(tmp, marker)


def prepare_run_folder(config: TrainConfig, manager: CheckpointManager, lock: RunLock, runtime: Runtime) -> None:
    """Rank 0, before any work: the folder is usable (not a file, writable, free space), owned
    by this trainer alone, and does not hold another run unless resuming or --overwrite."""
    experiment = config.experiment_dir
    for folder in (Path(config.output_dir), experiment):
        if folder.exists() and not folder.is_dir():
            raise ConfigError(f"output folder {folder} exists and is not a folder")
    check_writable(manager.root)
    notice = lock.acquire()
    if notice:
        log(runtime, f"notice: {notice}")
    resuming = bool(config.resume or config.resume_step)
    metrics = experiment / "metrics.jsonl"
    holds_run = bool(manager.complete_checkpoints()) or (metrics.is_file() and metrics.stat().st_size > 0)
    if holds_run and not resuming:
        if not config.overwrite:
            raise ConfigError(f"{experiment} holds a run (checkpoints or metrics); continue it with --resume auto, "
                              f"or replace it with --overwrite")
        import shutil

        shutil.rmtree(manager.root)  # the old run's checkpoints must not be taken for this run's
        check_writable(manager.root)
        log(runtime, f"--overwrite: the run in {experiment} is replaced")
    if resuming and manager.complete_checkpoints():
        import shutil

        needed = max(sum(f.stat().st_size for f in p.rglob("*") if f.is_file()) for p in manager.complete_checkpoints())
        free = shutil.disk_usage(manager.root).free
        if free < needed:
            raise RunFolderError(f"{manager.root} has {free / 2**20:.0f} MiB free; a checkpoint of this run needs "
                                 f"{needed / 2**20:.0f} MiB")
    (experiment / PREEMPTED_MARKER).unlink(missing_ok=True)


def agree_on_start(runtime: Runtime, error: Optional[BaseException]) -> None:
    """Rank 0's start-up checks stop every rank, each with one line."""
    if not dist.is_initialized():
        if error is not None:
            raise error
        return
    flag = torch.tensor([1.0 if error is not None else 0.0], device=runtime.device)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    if error is not None:
        raise error
    if flag.item() > 0:
        raise ConfigError("rank 0 refused to start (see its message)")


# ---------------------------------------------------------------------------------------
# The loop
# ---------------------------------------------------------------------------------------
class PreemptionFlag:
    """Set by SIGTERM, SIGINT (Ctrl-C) or SIGUSR1, or when the launcher is gone: under
    ``deepspeed``/``torchrun`` the trainer's parent is the per-node launcher. When the launcher
    dies, Linux sends SIGTERM (``PR_SET_PDEATHSIG``). Under ``deepspeed`` the launcher has a
    parent of its own, the runner (the ``deepspeed`` command); when only the runner dies (it
    forwards no signal on one node) the launcher trains on, orphaned, and nothing signals
    anyone: so the launcher's parent is compared with the one seen at start at every step.
    (Not under torchrun: its parent is the user's shell, which may end under nohup.)"""

    def __init__(self, launcher: Optional[str]):
        self.signal = None
        self.reason = None
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1):
            signal.signal(sig, self._handler)
        self._launcher = self._launcher_parent = None
        if launcher is not None and sys.platform.startswith("linux"):
            self._launcher = os.getppid()
            self._launcher_parent = proc_stat_field(self._launcher, "ppid") if launcher == "deepspeed" else None
            try:
                pr_set_pdeathsig = 1
                ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, int(signal.SIGTERM), 0, 0, 0)
            except (OSError, AttributeError):
                pass  # launcher_gone() still notices

    def _handler(self, signum, frame):
        self.signal = signum
        self.reason = f"signal {signal.Signals(signum).name}"

    def launcher_gone(self) -> bool:
        if self._launcher is None:
            return False
        if os.getppid() != self._launcher:
            self.reason = f"launcher (pid {self._launcher}) exited"
            return True
        if self._launcher_parent is not None and proc_stat_field(self._launcher, "ppid") != self._launcher_parent:
            self.reason = f"launcher (pid {self._launcher}) orphaned: its parent {self._launcher_parent} exited"
            return True
        return False

    def raised(self, runtime: Runtime) -> bool:
        local = self.signal is not None or self.launcher_gone()
        flag = torch.tensor([1.0 if local else 0.0], device=runtime.device)
        if dist.is_initialized():
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return flag.item() > 0


def reduce_logs(logs: Dict[str, torch.Tensor], runtime: Runtime) -> Dict[str, float]:
    keys = sorted(k for k, v in logs.items() if torch.is_tensor(v))
    if not keys:
        return {}
    values = torch.stack([logs[k].detach().float().reshape(()) for k in keys]).to(runtime.device)
    if dist.is_initialized():
        dist.all_reduce(values)
        values /= runtime.world_size
    return dict(zip(keys, values.tolist()))


def close_log_file() -> None:
    global _log_file
    if _log_file is not None:
        _log_file.close()
        _log_file = None


def train(config: TrainConfig, runtime: Runtime, launcher: Optional[str] = None) -> int:
    """``launcher``: "deepspeed", "torchrun" or None (started directly)."""
    micro_batch = validate_world(config, runtime.world_size)
    validate_files(config)
    experiment = config.experiment_dir
    manager = CheckpointManager(experiment / "checkpoints", keep_last=config.keep_last_checkpoints)
    lock = RunLock(experiment)
    try:
        return _train(config, runtime, micro_batch, manager, lock, launcher)
    finally:
        close_log_file()
        lock.release()


def _train(config: TrainConfig, runtime: Runtime, micro_batch: int, manager: CheckpointManager, lock: RunLock,
           launcher: Optional[str]) -> int:
    global _log_file
    experiment = config.experiment_dir
    error = None
    if runtime.is_main:
        try:
            prepare_run_folder(config, manager, lock, runtime)
        except (ConfigError, RunFolderError) as caught:
            error = caught
    agree_on_start(runtime, error)
    if runtime.is_main:  # before the resume checks, so their notices are in log.txt too
        _log_file = open(experiment / "log.txt", "a", encoding="utf-8")
    resume_from = choose_resume(config, manager)
    resumed = read_resume_state(resume_from, runtime) if resume_from is not None else None
    if resumed is not None:
        check_resumed_config(config, resumed, runtime)
    seed_everything(config.seed + runtime.rank)
    if runtime.is_main:
        (experiment / "args.json").write_text(json.dumps(config.to_dict(), indent=2, default=str))
    if config.train_mode == "ldm":
        from repa_e_fast.data.cached_latents import CachedLatentLoader
        from repa_e_fast.data.official_latents import OfficialLatentLoader

        cls = OfficialLatentLoader if str(config.latents_path).endswith(".h5") else CachedLatentLoader
        loader = cls(config.latents_path, micro_batch, rank=runtime.rank,
                     world_size=runtime.world_size, seed=config.seed, device=runtime.device)
    else:
        loader = build_loader(config, runtime, micro_batch)
    log(runtime, f"{runtime.backend} backend, {runtime.world_size} rank(s) on {runtime.device}; "
                 f"{loader.num_images} images, {loader.num_classes} classes, {len(loader)} batches/epoch/rank")
    models = build_models(config, runtime)
    backend = build_backend(config, runtime, models, micro_batch)
    step_config = StepConfig(
        path_type=config.path_type, weighting=config.weighting, proj_coeff=config.proj_coeff,
        vae_align_proj_coeff=config.vae_align_proj_coeff, max_grad_norm=config.max_grad_norm,
        ema_decay=config.ema_decay)
    step_cls = LDMStep if config.train_mode == "ldm" else REPAEStep
    step_fn = step_cls(backend, models["ema"], step_config, encoders=models["encoders"])

    if resumed is not None:
        progress = load_checkpoint(resumed, config, runtime, models, backend, loader)
        log(runtime, f"resumed from {resume_from} at step {progress.step}")
    elif config.init_from:
        progress = init_from_official(config.init_from, config, runtime, models, backend)
        log(runtime, f"initialised from {config.init_from} (step {progress.step})")
    else:
        progress = Progress()
    logger = MetricsLogger(experiment, config.report_to, config.to_dict(), config.wandb_project, config.exp_name,
                           resume=resume_from is not None, wandb_run_id=progress.wandb_run_id,
                           resume_step=progress.step) if runtime.is_main else None
    if logger is not None:
        progress.wandb_run_id = logger.wandb_run_id
    if logger is not None and resume_from is not None:
        logger.truncate_after(progress.step)

    preemption = PreemptionFlag(launcher)
    injection = config.fault_injection or {}
    inject_steps = set(injection.get("steps", []))  # tests: poison `count` attempts at these steps
    injected: Dict[int, int] = {}
    bar = None
    if runtime.is_main:
        from tqdm import tqdm

        bar = tqdm(total=config.max_train_steps, initial=progress.step, desc="train", dynamic_ncols=True,
                   mininterval=2.0)
    last_saved = progress.step if resume_from is not None else -1
    window_start, window_images = time.perf_counter(), 0
    try:
        while progress.step < config.max_train_steps and loader.epoch < config.epochs:
            for batch in loader:
                sync = backend.sync_step
                poison = progress.step in inject_steps and injected.get(progress.step, 0) < injection.get("count", 1)
                step_fn.inject_fault = injection.get("loss") if poison else None
                if poison:
                    injected[progress.step] = injected.get(progress.step, 0) + 1
                if config.train_mode == "ldm":
                    moments, images, labels = batch
                    logs = step_fn(moments, labels, images=images)
                else:
                    images, labels = batch
                    logs = step_fn(images, labels, progress.step)
                window_images += images.shape[0] * runtime.world_size
                if step_fn.last_fault is not None:
                    progress.skipped_steps += 1
                    progress.consecutive_faults += 1
                    log(runtime, f"step {progress.step}: non-finite {step_fn.last_fault}; update skipped "
                                 f"({progress.consecutive_faults} in a row, {progress.skipped_steps} in total)")
                    if progress.consecutive_faults >= config.max_consecutive_faults:
                        good = manager.complete_checkpoints()
                        raise TrainingAborted(
                            f"{progress.consecutive_faults} consecutive steps had non-finite values (last: "
                            f"{step_fn.last_fault}); stopping. The last good checkpoint is "
                            f"{good[-1] if good else 'none (no checkpoint was written yet)'}")
                    continue
                if not sync:
                    continue
                progress.consecutive_faults = 0
                progress.step += 1
                progress.images_seen += config.batch_size
                if progress.step % config.log_every == 0 or progress.step == config.max_train_steps:
                    values = reduce_logs(logs, runtime)
                    elapsed = time.perf_counter() - window_start
                    values.update(epoch=loader.epoch, images_per_sec=window_images / max(elapsed, 1e-9),
                                  skipped_steps=progress.skipped_steps)
                    window_start, window_images = time.perf_counter(), 0
                    if logger is not None:
                        logger.log(progress.step, values)
                        shown = {short: f"{values[key]:.4f}" for key, short in
                                 (("sit_loss", "sit"), ("vae_loss", "vae"), ("d_loss", "d")) if key in values}
                        bar.set_postfix(**shown, img_s=f"{values['images_per_sec']:.1f}", refresh=False)
                if bar is not None:
                    bar.update(1)
                if runtime.is_main and (progress.step == 1 or progress.step % config.sampling_steps == 0):
                    grid = write_optional(runtime, "sample grid", lambda: sample_grid(
                        config, runtime, models, backend, progress.step, experiment / "samples",
                        real_images=images))
                    if grid is not None:
                        logger.log_image(progress.step, "samples", grid)
                if progress.step % config.checkpointing_steps == 0:
                    save_checkpoint(manager, config, runtime, models, backend, loader, progress)
                    last_saved = progress.step
                if preemption.raised(runtime):
                    if last_saved != progress.step:
                        save_checkpoint(manager, config, runtime, models, backend, loader, progress)
                    reason = preemption.reason or "another rank"
                    if runtime.is_main:
                        write_preempted_marker(experiment, progress.step, reason)
                    log(runtime, f"preempted by {reason}: checkpoint at step {progress.step} written, "
                                 f"{experiment / PREEMPTED_MARKER} marks it; rerun with --resume auto")
                    return EXIT_PREEMPTED
                if progress.step >= config.max_train_steps:
                    break
        if last_saved != progress.step:
            save_checkpoint(manager, config, runtime, models, backend, loader, progress)
        if runtime.is_main:
            grid = write_optional(runtime, "sample grid", lambda: sample_grid(
                config, runtime, models, backend, progress.step, experiment / "samples"))
            if grid is not None:
                logger.log_image(progress.step, "samples", grid)
            write_optional(runtime, "loss curve", lambda: plot_loss_curves(
                read_metrics(logger.path), LOGGED_CURVES, experiment / "loss_curve.png"))
            stats = getattr(loader, "stats", {})
            log(runtime, f"done: {progress.step} steps, {progress.skipped_steps} skipped, "
                         f"{stats.get('bad_images', 0)} bad images skipped; outputs in {experiment}")
    finally:
        if bar is not None:
            bar.close()
        if logger is not None:
            logger.close()
    return EXIT_OK


def main(argv=None) -> int:
    try:
        config, launcher_local_rank = parse_config(argv)
        runtime = setup_runtime(config, launcher_local_rank)
    except ConfigError as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_ERROR
    launcher = "torchrun" if "TORCHELASTIC_RUN_ID" in os.environ else (
        "deepspeed" if launcher_local_rank is not None else None)
    try:
        with watch_peers(config.dist_timeout):  # a lost node: one message naming it, exit 76
            return train(config, runtime, launcher)
    except TrainingAborted as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_FAULTS
    except (ConfigError, NoGoodCheckpoint, CheckpointWriteError, RunFolderError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_ERROR
    except ValueError as error:
        # Data and checkpoint loaders raise ValueError subclasses with the file in the message.
        if type(error).__name__ in ("DatasetError", "CheckpointError"):
            print(f"error: {error}", file=sys.stderr)
            return EXIT_ERROR
        raise
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
