"""Building a run from its config: the data loader, the models, the backend and the step.

``make_backend`` is the one place a backend is assembled from models and optimizer settings;
the trainer (``build_backend``), parity, the benchmarks and the distributed test harness all
call it. ``build_models`` is the model set of a training run: the SiT and its EMA, the VAE,
the VAE-loss module under ``"vae_loss"`` (LPIPS and discriminator) and the frozen encoders.
"""

import copy
import os
import warnings
from pathlib import Path
from typing import Dict, Optional, Sequence

import torch
import torch.nn as nn

from ..config import ConfigError, TrainConfig
from .backends import DDPBackend, SingleProcessBackend, TrainingBackend, build_adamw
from .ema import update_ema
from .runtime import Runtime
from .step import LDMStep, REPAEStep, StepConfig
from .sync_batchnorm import convert_to_global_batchnorm

DEEPSPEED_TEMPLATES = Path(__file__).resolve().parent.parent.parent / "configs" / "deepspeed"
DEFAULT_DEEPSPEED_TEMPLATE = {"bf16": "zero2_bf16.json", "fp16": "zero2_fp16.json", "fp32": "zero0_fp32.json"}


def build_loader(config: TrainConfig, runtime: Runtime, micro_batch: int):
    """Images (REPA-E) or cached latents (LDM-only), this rank's share of each global batch."""
    if config.train_mode == "ldm":
        from repa_e_fast.data.cached_latents import CachedLatentLoader
        from repa_e_fast.data.official_latents import OfficialLatentLoader

        cls = OfficialLatentLoader if str(config.latents_path).endswith(".h5") else CachedLatentLoader
        return cls(config.latents_path, micro_batch, rank=runtime.rank, world_size=runtime.world_size,
                   seed=config.seed, device=runtime.device)
    from repa_e_fast.data import build_image_loader, ensure_demo_dataset

    path = ensure_demo_dataset() if config.demo_dataset else config.data_dir
    loader = build_image_loader(path, micro_batch, resolution=config.resolution, rank=runtime.rank,
                                world_size=runtime.world_size, seed=config.seed, device=runtime.device,
                                loader=config.data_loader, num_workers=config.num_workers, shuffle=True,
                                drop_last=True, hflip=config.hflip)
    if loader.num_classes > config.num_classes:
        raise ConfigError(f"the dataset at {path} has {loader.num_classes} classes but num_classes is "
                          f"{config.num_classes}")
    if len(loader) == 0:
        raise ConfigError(f"the dataset at {path} has {loader.num_images} images: fewer than one global batch "
                          f"of {config.batch_size // config.gradient_accumulation_steps}")
    return loader


def build_models(config: TrainConfig, runtime: Runtime) -> Dict[str, object]:
    """``{"encoders", "ema", "sit", "vae"}`` plus ``"vae_loss"`` (the VAE-loss module) in REPA-E
    mode, on the runtime's device, initialised as the official trainer does."""
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
    # Taken before the BN initialisation (docs/numerics.md#set-up-order).
    ema = copy.deepcopy(sit).requires_grad_(False)

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
        # LDM-only (docs/step.md#the-ldm-only-step): frozen VAE (sample grids only), BN fixed,
        # pos_embed frozen.
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

    # Trained in REPA-E (docs/numerics.md#pos_embed-is-trained); set before any wrapper registers parameters.
    sit.pos_embed.requires_grad_(True)
    if runtime.world_size > 1:
        convert_to_global_batchnorm(sit)  # SyncBN on the latents, as the official multi-GPU run
        if config.sync_discriminator_bn:
            convert_to_global_batchnorm(loss_fn.discriminator)
    update_ema(ema, sit, decay=0.0)  # exact copy, BN statistics included (step 13)
    models = {"sit": sit, "vae": vae, "vae_loss": loss_fn}
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


def make_backend(kind: str, models: Dict[str, nn.Module], optimizer_settings: Dict[str, dict],
                 precision: str = "fp32", gradient_accumulation_steps: int = 1,
                 device: Optional[torch.device] = None, fused_adam: bool = False,
                 ds_config=None, micro_batch_size: int = 1, max_grad_norm: float = 1.0) -> TrainingBackend:
    """A backend of ``kind`` ("single", "ddp" or "deepspeed") training ``models``, each with an
    AdamW of ``optimizer_settings[name]`` (``lr``, ``betas``, ``eps``, ``weight_decay``).
    ``fused_adam``: torch's fused AdamW (CUDA); ``ds_config``: a DeepSpeed template (path or
    dict), filled by ``load_deepspeed_config``."""
    if kind == "deepspeed":
        from .backend_deepspeed import DeepSpeedBackend

        return DeepSpeedBackend(models, optimizer_settings, ds_config, precision=precision,
                                gradient_accumulation_steps=gradient_accumulation_steps,
                                micro_batch_size=micro_batch_size, max_grad_norm=max_grad_norm, device=device)
    optimizers = {k: build_adamw(m, fused=fused_adam or None, **optimizer_settings[k]) for k, m in models.items()}
    cls = {"single": SingleProcessBackend, "ddp": DDPBackend}[kind]
    return cls(models, optimizers, precision, gradient_accumulation_steps, device)


def build_backend(config: TrainConfig, runtime: Runtime, models: Dict[str, nn.Module],
                  micro_batch: int) -> TrainingBackend:
    """The runtime's backend over the models the config trains (the SiT; in REPA-E mode also
    the VAE and the loss module), with the configured AdamW settings."""
    trainable = {k: models[k] for k in (("sit",) if config.train_mode == "ldm" else ("sit", "vae", "vae_loss"))}
    lrs = config.learning_rates()
    adam = dict(betas=(config.adam_beta1, config.adam_beta2), eps=config.adam_epsilon,
                weight_decay=config.adam_weight_decay)
    ds_config = None
    if runtime.distributed == "deepspeed":
        from .backend_deepspeed import load_deepspeed_config

        template = config.deepspeed_config or str(DEEPSPEED_TEMPLATES / DEFAULT_DEEPSPEED_TEMPLATE[config.precision])
        ds_config = load_deepspeed_config(template, precision=config.precision, micro_batch_size=micro_batch,
                                          gradient_accumulation_steps=config.gradient_accumulation_steps,
                                          max_grad_norm=config.max_grad_norm, world_size=runtime.world_size)
        if config.zero_stage is not None:
            ds_config.setdefault("zero_optimization", {})["stage"] = config.zero_stage
    return make_backend(runtime.distributed, trainable, {k: dict(lr=lrs[k], **adam) for k in trainable},
                        precision=config.precision, gradient_accumulation_steps=config.gradient_accumulation_steps,
                        device=runtime.device, fused_adam=runtime.device.type == "cuda", ds_config=ds_config,
                        micro_batch_size=micro_batch, max_grad_norm=config.max_grad_norm)


def build_step(config: TrainConfig, backend: TrainingBackend, ema: nn.Module, encoders: Sequence[nn.Module]):
    """The training step of the config's mode: ``REPAEStep`` (end to end) or ``LDMStep``."""
    step_config = StepConfig(
        path_type=config.path_type, weighting=config.weighting, proj_coeff=config.proj_coeff,
        vae_align_proj_coeff=config.vae_align_proj_coeff, max_grad_norm=config.max_grad_norm,
        ema_decay=config.ema_decay)
    step_cls = LDMStep if config.train_mode == "ldm" else REPAEStep
    return step_cls(backend, ema, step_config, encoders=encoders)
