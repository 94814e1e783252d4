"""REPA-E training: ``deepspeed repa_e_fast/train.py``, ``torchrun ... repa_e_fast/train.py``
or ``python -m repa_e_fast.train`` with ``--config configs/<setup>.yaml`` and the official
flags (see ``config.py``).

The loop is the official one (spec §2): one REPA-E step per batch (``engine/step.py``), EMA,
logging of the official values, periodic sample grids and checkpoints. Around it, what a
long run on a shared cluster needs: checks before anything expensive, exact resume
(``--resume auto``), atomic checkpoints, SIGTERM/SIGUSR1 -> checkpoint and exit 75, and
non-finite steps skipped then, after ``max_consecutive_faults`` in a row, exit 65.
"""

import copy
import math
import os
import signal
import sys
import time
import warnings
from dataclasses import dataclass
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
from repa_e_fast.engine.checkpoint import (CheckpointManager, CheckpointWriteError, NoGoodCheckpoint,
                                          rng_state, set_rng_state, verify_checkpoint)
from repa_e_fast.engine.ema import update_ema
from repa_e_fast.engine.reporting import MetricsLogger, plot_loss_curves, read_metrics, save_image_grid
from repa_e_fast.engine.step import LDMStep, REPAEStep, StepConfig
from repa_e_fast.engine.sync_batchnorm import convert_to_global_batchnorm

EXIT_OK = 0
EXIT_ERROR = 2  # bad configuration, data or checkpoint: nothing was trained
EXIT_FAULTS = 65  # too many consecutive non-finite steps; the last good checkpoint is intact
EXIT_PREEMPTED = 75  # SIGTERM/SIGUSR1: a checkpoint was written; rerun with --resume auto

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


def log(runtime: Runtime, message: str) -> None:
    if runtime.is_main:
        print(f"[repa_e_fast] {message}", flush=True)


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
        deepspeed.init_distributed(dist_backend=comm)
    elif backend == "ddp":
        dist.init_process_group(comm)
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
        for module in models.values():
            module.compile()  # in place: state-dict keys stay the official ones
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
        return found  # None: a fresh start
    path = Path(config.resume)
    problem = verify_checkpoint(path)
    if problem:
        raise NoGoodCheckpoint(f"cannot resume from {path}: {problem}")
    return path


def load_checkpoint(path: Path, config, runtime, models, backend, loader) -> Progress:
    from repa_e_fast.models.checkpoints import load_state_dict_strict

    problem = verify_checkpoint(path)
    if problem:
        raise NoGoodCheckpoint(f"cannot resume from {path}: {problem}")
    official = torch.load(path / "official.pt", map_location="cpu", weights_only=False)
    trainer = torch.load(path / "trainer.pt", map_location="cpu", weights_only=False)
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
    loader.load_state_dict(trainer["loader"])
    rng_file = path / "rng" / f"rank{runtime.rank:05d}.pt"
    if trainer["world_size"] == runtime.world_size and rng_file.is_file():
        set_rng_state(torch.load(rng_file, weights_only=False))
    else:
        log(runtime, f"world size changed ({trainer['world_size']} -> {runtime.world_size}): RNG streams reseeded")
        seed_everything(config.seed + runtime.rank + 7919 * trainer["progress"]["step"])
    return Progress(**trainer["progress"])


def init_from_official(path: str, runtime, models, backend) -> Progress:
    """Start from an official single-file checkpoint (weights, optimizers when present, steps)."""
    from repa_e_fast.models.checkpoints import load_state_dict_file, load_state_dict_strict

    load_state_dict_strict(backend.unwrap("sit"), load_state_dict_file(path, "model"), f"SiT from {path}")
    load_state_dict_strict(models["ema"], load_state_dict_file(path, "ema"), f"EMA from {path}")
    load_state_dict_strict(backend.unwrap("vae"), load_state_dict_file(path, "vae"), f"VAE from {path}")
    load_state_dict_strict(backend.unwrap("disc").discriminator, load_state_dict_file(path, "discriminator"),
                           f"discriminator from {path}")
    full = torch.load(path, map_location="cpu", weights_only=False)
    if all(k in full for k in ("opt", "opt_vae", "opt_disc")) and isinstance(backend, SingleProcessBackend):
        backend.load_state_dict({"optimizers": {"sit": full["opt"], "vae": full["opt_vae"], "disc": full["opt_disc"]}})
    else:
        log(runtime, f"{path}: optimizer states not loaded (absent, or a DeepSpeed run); Adam restarts")
    return Progress(step=int(full.get("steps", 0)))


# ---------------------------------------------------------------------------------------
# Sampling for the periodic grids
# ---------------------------------------------------------------------------------------
@torch.no_grad()
def sample_grid(config: TrainConfig, runtime: Runtime, models, backend, step: int, directory: Path) -> Path:
    """EMA samples, fixed noise and labels (a private generator: the training RNG streams are
    untouched, so sampling never changes the run)."""
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
    vae.train(was_training)
    images = torch.clamp(255 * (images + 1) / 2, 0, 255).to(torch.uint8)  # official truncating cast
    # Labels cycle through the classes, so with a multiple of num_classes each column is one class.
    columns = config.num_classes if count % config.num_classes == 0 and config.num_classes <= 16 else None
    return save_image_grid(images, directory / f"samples_{step:07d}.png", columns=columns)


# ---------------------------------------------------------------------------------------
# The loop
# ---------------------------------------------------------------------------------------
class PreemptionFlag:
    def __init__(self):
        self.signal = None
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            signal.signal(sig, self._handler)

    def _handler(self, signum, frame):
        self.signal = signum

    def raised(self, runtime: Runtime) -> bool:
        flag = torch.tensor([1.0 if self.signal is not None else 0.0], device=runtime.device)
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


def train(config: TrainConfig, runtime: Runtime) -> int:
    micro_batch = validate_world(config, runtime.world_size)
    validate_files(config)
    seed_everything(config.seed + runtime.rank)
    experiment = config.experiment_dir
    if runtime.is_main:
        experiment.mkdir(parents=True, exist_ok=True)
        import json

        (experiment / "args.json").write_text(json.dumps(config.to_dict(), indent=2, default=str))
    if config.train_mode == "ldm":
        from repa_e_fast.data.cached_latents import CachedLatentLoader

        loader = CachedLatentLoader(config.latents_path, micro_batch, rank=runtime.rank,
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

    manager = CheckpointManager(experiment / "checkpoints", keep_last=config.keep_last_checkpoints)
    resume_from = choose_resume(config, manager)
    if resume_from is not None:
        progress = load_checkpoint(resume_from, config, runtime, models, backend, loader)
        log(runtime, f"resumed from {resume_from} at step {progress.step}")
    elif config.init_from:
        progress = init_from_official(config.init_from, runtime, models, backend)
        log(runtime, f"initialised from {config.init_from} (step {progress.step})")
    else:
        progress = Progress()
    logger = MetricsLogger(experiment, config.report_to, config.to_dict(), config.wandb_project, config.exp_name,
                           resume=resume_from is not None) if runtime.is_main else None
    if logger is not None and resume_from is not None:
        logger.truncate_after(progress.step)

    preemption = PreemptionFlag()
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
                    grid = sample_grid(config, runtime, models, backend, progress.step, experiment / "samples")
                    logger.log_image(progress.step, "samples", grid)
                if progress.step % config.checkpointing_steps == 0:
                    save_checkpoint(manager, config, runtime, models, backend, loader, progress)
                    last_saved = progress.step
                if preemption.raised(runtime):
                    if last_saved != progress.step:
                        save_checkpoint(manager, config, runtime, models, backend, loader, progress)
                    log(runtime, f"preempted by signal {preemption.signal or '(another rank)'}: checkpoint at "
                                 f"step {progress.step} written; rerun with --resume auto")
                    return EXIT_PREEMPTED
                if progress.step >= config.max_train_steps:
                    break
        if last_saved != progress.step:
            save_checkpoint(manager, config, runtime, models, backend, loader, progress)
        if runtime.is_main:
            grid = sample_grid(config, runtime, models, backend, progress.step, experiment / "samples")
            logger.log_image(progress.step, "samples", grid)
            plot_loss_curves(read_metrics(logger.path), LOGGED_CURVES, experiment / "loss_curve.png")
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
    try:
        return train(config, runtime)
    except TrainingAborted as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_FAULTS
    except (ConfigError, NoGoodCheckpoint, CheckpointWriteError, FileNotFoundError) as error:
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
