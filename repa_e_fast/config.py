"""Training configuration: a YAML file, overridden by command-line flags.

Every field of ``TrainConfig`` is a YAML key (``snake_case``) and a flag (``--kebab-case``),
so the official REPA-E flags (``--model``, ``--vae``, ``--vae-ckpt``, ``--enc-type``,
``--proj-coeff``, ``--vae-align-proj-coeff``, ``--encoder-depth``, ``--bn-momentum``,
``--batch-size``, ``--max-train-steps``, ``--mixed-precision``, ...) work unchanged with the
official defaults. ``validate`` checks everything that can be checked before a model is
built (values, combinations, files) and raises ``ConfigError`` with one clear line.
"""

import argparse
import dataclasses
import difflib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import yaml

from .models.sit import PATCH_SIZES, SIT_CONFIGS, sit_config
from .models.vae import VAE_LAYOUTS


class ConfigError(ValueError):
    """A configuration problem, reported before any expensive work."""


VAE_DOWNSAMPLING = {"f8d4": 8, "f16d32": 16}
VAE_LATENT_CHANNELS = {"f8d4": 4, "f16d32": 32}
PRECISION_NAMES = {"no": "fp32", "fp32": "fp32", "bf16": "bf16", "fp16": "fp16"}


@dataclass
class TrainConfig:
    # -- experiment ---------------------------------------------------------------------
    output_dir: str = "exps"
    exp_name: str = "repae-sit-xl-2"
    train_mode: str = "repae"  # "repae" (end to end) or "ldm" (SiT on cached latents, frozen VAE)
    seed: int = 0
    report_to: str = "jsonl"  # comma list of: jsonl, tensorboard, wandb
    wandb_project: str = "repa-e-fast"
    log_every: int = 1
    checkpointing_steps: int = 50000
    keep_last_checkpoints: int = 3
    sampling_steps: int = 10000
    sample_grid_size: int = 16
    sample_num_steps: int = 50  # Euler ODE steps of the periodic sample grids (official: 50)
    sample_cfg_scale: float = 4.0  # guidance of the sample grids (official: 4.0 on [0, 1])
    resume: Optional[str] = None  # None, "auto" (latest good checkpoint) or a checkpoint directory
    resume_step: int = 0  # official flag: resume from <output>/<exp>/checkpoints/<step:07d>
    init_from: Optional[str] = None  # an official single-file checkpoint to start from (weights + optimizers)
    overwrite: bool = False  # replace a run already in the output folder (otherwise: --resume auto, or refused)
    max_consecutive_faults: int = 20
    fault_injection: Optional[Dict[str, Any]] = None  # tests only: {loss: sit_loss, steps: [..], count: 1}
    # -- model --------------------------------------------------------------------------
    model: str = "SiT-XL/2"
    model_overrides: Dict[str, Any] = field(default_factory=dict)  # e.g. {depth: 2, hidden_size: 64}
    num_classes: int = 1000
    encoder_depth: int = 8
    fused_attn: bool = True
    qk_norm: bool = False
    bn_momentum: float = 0.1
    cfg_prob: float = 0.1
    vae: str = "f8d4"
    vae_ch: int = 128
    vae_ckpt: Optional[str] = "pretrained/sdvae/sdvae-f8d4.pt"
    disc_pretrained_ckpt: Optional[str] = None
    loss_cfg_path: Optional[str] = None  # the official VAE-loss YAML; None = its shipped defaults
    enc_type: str = "dinov2-vit-b"
    encoder_ckpts: Optional[List[str]] = None
    pretrained_dir: str = "pretrained"
    allow_random_encoder: bool = False  # demo only
    lpips_vgg16_ckpt: str = "pretrained/vgg16-397923af.pth"
    lpips_lin_ckpt: str = "pretrained/vgg.pth"
    allow_random_lpips: bool = False  # demo only
    # -- data ---------------------------------------------------------------------------
    data_dir: str = "data"
    latents_path: Optional[str] = None  # LDM mode: the directory written by repa_e_fast.cache_latents
    demo_dataset: bool = False  # generate the embedded demo dataset and train on it
    resolution: int = 256
    batch_size: int = 256  # GLOBAL batch (all ranks, one micro-step)
    num_workers: int = 4
    data_backend: str = "auto"  # auto | dali | torch
    hflip: bool = False
    # -- optimisation -------------------------------------------------------------------
    epochs: int = 1400
    max_train_steps: int = 400000
    gradient_accumulation_steps: int = 1
    mixed_precision: str = "fp16"  # no | fp16 | bf16
    allow_tf32: bool = True
    learning_rate: float = 1e-4
    vae_learning_rate: float = 1e-4
    disc_learning_rate: float = 1e-4
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_weight_decay: float = 0.0
    adam_epsilon: float = 1e-8
    max_grad_norm: float = 1.0
    ema_decay: float = 0.9999
    # -- loss ---------------------------------------------------------------------------
    path_type: str = "linear"
    prediction: str = "v"
    weighting: str = "uniform"
    proj_coeff: float = 0.5
    vae_align_proj_coeff: float = 1.5
    # -- engine -------------------------------------------------------------------------
    backend: str = "auto"  # auto | single | ddp | deepspeed
    deepspeed_config: Optional[str] = None  # JSON template; None = configs/deepspeed/zero2_<precision>.json
    zero_stage: Optional[int] = None  # overrides the template's stage
    fused_ops: bool = False  # Triton kernels (CUDA); the reference PyTorch path otherwise
    attn_backend: str = "sdpa"
    channels_last: bool = False
    compile: bool = False
    sync_discriminator_bn: bool = False  # global-batch BN in the discriminator (the official D uses per-rank statistics)
    device: Optional[str] = None  # default: cuda:<local_rank> when available, else cpu

    # -- derived values -----------------------------------------------------------------
    @property
    def precision(self) -> str:
        return PRECISION_NAMES[self.mixed_precision]

    @property
    def latent_size(self) -> int:
        return self.resolution // VAE_DOWNSAMPLING[self.vae]

    @property
    def latent_channels(self) -> int:
        return VAE_LATENT_CHANNELS[self.vae]

    @property
    def experiment_dir(self) -> Path:
        return Path(self.output_dir) / self.exp_name

    def latents_stats_path(self) -> Optional[str]:
        if not self.vae_ckpt:
            return None
        return self.vae_ckpt[: -len(".pt")] + "-latents-stats.pt" if self.vae_ckpt.endswith(".pt") \
            else self.vae_ckpt + "-latents-stats.pt"

    def sit_kwargs(self) -> Dict[str, Any]:
        kwargs = sit_config(self.model)
        kwargs.update(input_size=self.latent_size, in_channels=self.latent_channels, num_classes=self.num_classes,
                      class_dropout_prob=self.cfg_prob, encoder_depth=self.encoder_depth, bn_momentum=self.bn_momentum,
                      qk_norm=self.qk_norm, fused_attn=self.fused_attn, attn_backend=self.attn_backend,
                      fused_ops=self.fused_ops)
        kwargs.update(self.model_overrides)
        return kwargs

    def to_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)

    def official_args(self) -> argparse.Namespace:
        """The ``args`` entry of an official checkpoint (and ``args.json``): our fields,
        which carry the official names, plus ``mixed_precision`` in its official spelling."""
        values = self.to_dict()
        values["mixed_precision"] = "no" if self.precision == "fp32" else self.precision
        return argparse.Namespace(**values)


FIELDS = {f.name: f for f in dataclasses.fields(TrainConfig)}
CHOICES = {
    "train_mode": ("repae", "ldm"),
    "mixed_precision": tuple(PRECISION_NAMES),
    "path_type": ("linear", "cosine"),
    "prediction": ("v",),
    "weighting": ("uniform", "lognormal"),
    "backend": ("auto", "single", "ddp", "deepspeed"),
    "data_backend": ("auto", "dali", "torch"),
    "attn_backend": ("sdpa", "flash_attn", "xformers", "math"),
    "vae": tuple(VAE_LAYOUTS),
}


def _did_you_mean(key: str) -> str:
    close = difflib.get_close_matches(key, list(FIELDS), n=1)
    return f" (did you mean '{close[0]}'?)" if close else ""


def load_yaml(path: str) -> Dict[str, Any]:
    if not os.path.isfile(path):
        raise ConfigError(f"config file not found: {path}")
    with open(path) as handle:
        try:
            values = yaml.safe_load(handle) or {}
        except yaml.YAMLError as error:
            raise ConfigError(f"{path} is not valid YAML: {error}") from None
    if not isinstance(values, dict):
        raise ConfigError(f"{path} must hold a mapping of config keys, got {type(values).__name__}")
    result = {}
    for key, value in values.items():
        name = str(key).replace("-", "_")
        if name not in FIELDS:
            raise ConfigError(f"unknown config key '{key}' in {path}{_did_you_mean(name)}")
        result[name] = value
    return result


def _parse_bool(text: str) -> bool:
    lowered = str(text).lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected a boolean, got {text!r}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="repa_e_fast.train",
        description="REPA-E training (end to end, or SiT on cached latents). YAML keys and flags share names.")
    parser.add_argument("--config", help="YAML file with TrainConfig keys; flags override it")
    # The deepspeed launcher appends --local_rank; torchrun sets LOCAL_RANK instead.
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    for name, f in FIELDS.items():
        flag = "--" + name.replace("_", "-")
        default_type = type(f.default) if f.default is not None and f.default is not dataclasses.MISSING else str
        if name in ("model_overrides", "fault_injection"):
            parser.add_argument(flag, type=json.loads, default=argparse.SUPPRESS, help="JSON mapping")
        elif name == "encoder_ckpts":
            parser.add_argument(flag, nargs="+", default=argparse.SUPPRESS)
        elif default_type is bool:
            # --allow-tf32 (official store_true) and --allow-tf32 false both work; --no-allow-tf32 too.
            parser.add_argument(flag, nargs="?", const=True, type=_parse_bool, default=argparse.SUPPRESS)
            parser.add_argument("--no-" + name.replace("_", "-"), dest=name, action="store_false",
                                default=argparse.SUPPRESS)
        elif name in ("zero_stage",):
            parser.add_argument(flag, type=int, default=argparse.SUPPRESS)
        else:
            parser.add_argument(flag, type=default_type, default=argparse.SUPPRESS,
                                choices=CHOICES.get(name))
    return parser


def parse_config(argv: Optional[Sequence[str]] = None) -> Tuple[TrainConfig, Optional[int]]:
    """(config, the ``--local_rank`` a deepspeed launcher passed, or None)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    values: Dict[str, Any] = load_yaml(args.config) if args.config else {}
    for name in FIELDS:
        if hasattr(args, name):
            values[name] = getattr(args, name)
    return make_config(values), args.local_rank


def make_config(values: Dict[str, Any]) -> TrainConfig:
    unknown = [k for k in values if k not in FIELDS]
    if unknown:
        raise ConfigError(f"unknown config key '{unknown[0]}'{_did_you_mean(unknown[0])}")
    coerced = {}
    for name, value in values.items():
        if isinstance(value, str) and value.lower() in ("none", "null") and "Optional" in str(FIELDS[name].type):
            value = None  # --vae-ckpt none
        default = FIELDS[name].default
        if value is not None and isinstance(default, (int, float)) and not isinstance(default, bool):
            try:
                value = type(default)(value)
            except (TypeError, ValueError):
                raise ConfigError(f"{name} must be a {type(default).__name__}, got {value!r}") from None
        coerced[name] = value
    config = TrainConfig(**coerced)
    validate_values(config)
    return config


def validate_values(config: TrainConfig) -> None:
    """Values and combinations; no file access."""
    for name, choices in CHOICES.items():
        if getattr(config, name) not in choices:
            raise ConfigError(f"{name} must be one of {list(choices)}, got {getattr(config, name)!r}")
    try:
        kwargs = config.sit_kwargs()
    except ValueError as error:
        raise ConfigError(str(error)) from None
    size_names = ", ".join(SIT_CONFIGS)
    if config.model_overrides and not isinstance(config.model_overrides, dict):
        raise ConfigError(f"model_overrides must be a mapping of SiT constructor arguments, sizes: {size_names}")
    positive = ("batch_size", "max_train_steps", "epochs", "gradient_accumulation_steps", "checkpointing_steps",
                "sampling_steps", "keep_last_checkpoints", "num_classes", "resolution", "log_every",
                "max_consecutive_faults", "vae_ch", "sample_grid_size", "sample_num_steps")
    for name in positive:
        if getattr(config, name) < 1:
            raise ConfigError(f"{name} must be >= 1, got {getattr(config, name)}")
    for name in ("learning_rate", "vae_learning_rate", "disc_learning_rate", "max_grad_norm"):
        if not getattr(config, name) > 0:
            raise ConfigError(f"{name} must be > 0, got {getattr(config, name)}")
    if config.num_workers < 0:
        raise ConfigError(f"num_workers must be >= 0, got {config.num_workers}")
    if not 0 <= config.cfg_prob < 1:
        raise ConfigError(f"cfg_prob must be in [0, 1), got {config.cfg_prob}")
    if not 0 <= config.ema_decay <= 1:
        raise ConfigError(f"ema_decay must be in [0, 1], got {config.ema_decay}")
    if config.proj_coeff < 0 or config.vae_align_proj_coeff < 0:
        raise ConfigError("proj_coeff and vae_align_proj_coeff must be >= 0")
    factor = VAE_DOWNSAMPLING[config.vae]
    if config.resolution % factor:
        raise ConfigError(f"resolution {config.resolution} is not a multiple of the {config.vae} VAE's "
                          f"downsampling factor {factor}")
    patch = kwargs["patch_size"]
    if patch not in PATCH_SIZES or config.latent_size % patch:
        raise ConfigError(f"{config.model}: patch size {patch} does not divide the latent size {config.latent_size} "
                          f"({config.resolution} px / {factor} for {config.vae})")
    if config.resolution % 16:
        raise ConfigError(f"resolution must be a multiple of 16 (DINOv2 patch grid), got {config.resolution}")
    tokens = (config.latent_size // patch) ** 2
    encoder_tokens = (config.resolution // 16) ** 2
    if tokens != encoder_tokens:
        raise ConfigError(f"{config.model} on {config.vae} latents has {tokens} tokens but the encoder at "
                          f"{config.resolution} px gives {encoder_tokens}; REPA aligns token by token "
                          f"(use patch size {config.latent_size * 16 // config.resolution})")
    if not 1 <= config.encoder_depth <= kwargs["depth"]:
        raise ConfigError(f"encoder_depth {config.encoder_depth} must be in [1, depth of {config.model} = "
                          f"{kwargs['depth']}]")
    if kwargs["hidden_size"] % kwargs["num_heads"]:
        raise ConfigError(f"hidden_size {kwargs['hidden_size']} is not divisible by num_heads {kwargs['num_heads']}")
    if config.train_mode == "ldm" and not config.latents_path:
        raise ConfigError("train_mode ldm needs latents_path (the directory written by repa_e_fast.cache_latents)")
    if config.zero_stage is not None and config.zero_stage not in (0, 1, 2):
        raise ConfigError(f"zero_stage must be 0, 1 or 2, got {config.zero_stage}")
    if config.fault_injection is not None and not isinstance(config.fault_injection, dict):
        raise ConfigError("fault_injection must be a mapping like {loss: sit_loss, steps: [3, 4]}")
    from .models.encoders import parse_enc_type

    try:
        parse_enc_type(config.enc_type, config.resolution)
    except ValueError as error:
        raise ConfigError(str(error)) from None


def validate_world(config: TrainConfig, world_size: int) -> int:
    """Per-rank micro-batch size for ``world_size`` ranks."""
    per_step = world_size * config.gradient_accumulation_steps
    if config.batch_size % per_step:
        raise ConfigError(f"batch_size {config.batch_size} must be divisible by world_size x "
                          f"gradient_accumulation_steps = {world_size} x {config.gradient_accumulation_steps}")
    return config.batch_size // per_step


def validate_files(config: TrainConfig) -> None:
    """Every file the run will read, checked up front."""
    def need(path: Optional[str], what: str, hint: str = "") -> None:
        if path and not os.path.exists(path):
            raise ConfigError(f"{what} not found: {path}{hint}")

    if config.train_mode == "repae":
        if config.vae_ckpt:
            need(config.vae_ckpt, "VAE checkpoint (vae_ckpt)",
                 " (the official initial VAEs are REPA-E/sdvae, REPA-E/invae, REPA-E/vavae; or set vae_ckpt: null "
                 "to start from a random VAE)")
            need(config.latents_stats_path(), "latent statistics of the VAE",
                 " (written next to the VAE as <name>-latents-stats.pt)")
        need(config.disc_pretrained_ckpt, "discriminator checkpoint (disc_pretrained_ckpt)")
        need(config.loss_cfg_path, "VAE loss config (loss_cfg_path)")
        if not config.allow_random_lpips:
            need(config.lpips_vgg16_ckpt, "LPIPS VGG16 weights (lpips_vgg16_ckpt)",
                 " (torchvision's vgg16-397923af.pth; or allow_random_lpips: true for a demo)")
            need(config.lpips_lin_ckpt, "LPIPS lin weights (lpips_lin_ckpt)", " (LPIPS v0.1 'vgg.pth')")
    else:
        need(config.latents_path, "cached latents (latents_path)")
        if config.vae_ckpt:
            need(config.vae_ckpt, "VAE checkpoint (vae_ckpt)")
            need(config.latents_stats_path(), "latent statistics of the VAE")
    if not config.demo_dataset and config.train_mode == "repae":
        need(config.data_dir, "dataset (data_dir)")
    if config.init_from:
        need(config.init_from, "checkpoint to start from (init_from)")
    if config.deepspeed_config:
        need(config.deepspeed_config, "DeepSpeed config (deepspeed_config)")
    if config.encoder_ckpts:
        for path in config.encoder_ckpts:
            need(path, "encoder checkpoint")
    elif not config.allow_random_encoder:
        from .models.encoders import parse_enc_type

        for spec in parse_enc_type(config.enc_type, config.resolution):
            need(os.path.join(config.pretrained_dir, spec.checkpoint_name), f"{spec} encoder checkpoint",
                 f" (the weights of DINOv2's hub entry '{spec.hub_name}'; or allow_random_encoder: true for a demo)")
