"""Training configuration: a YAML file, overridden by command-line flags.

Every field of ``TrainConfig`` is a YAML key (``snake_case``) and a flag (``--kebab-case``),
so the official REPA-E flags (``--model``, ``--vae``, ``--vae-ckpt``, ``--enc-type``,
``--proj-coeff``, ``--vae-align-proj-coeff``, ``--encoder-depth``, ``--bn-momentum``,
``--batch-size``, ``--max-train-steps``, ``--mixed-precision``, ...) work unchanged with the
official defaults. ``validate`` checks everything that can be checked before a model is
built (values, combinations, files) and raises ``ConfigError`` with one clear line.
"""

import argparse
import collections.abc
import dataclasses
import difflib
import inspect
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union, get_args, get_origin, get_type_hints

import yaml

from .models.sit import PATCH_SIZES, sit_config
from .errors import RepaEFastError
from .models.vae import VAE_LAYOUTS


class ConfigError(RepaEFastError, ValueError):
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
    continue_train_exp_dir: Optional[str] = None  # official: the run directory --resume-step reads
    logging_dir: str = "logs"  # official flag, accepted; our TensorBoard / W&B / log.txt are in the run folder
    wandb_history_path: Optional[str] = None  # official flag, accepted; the official script never reads it
    max_consecutive_faults: int = 20
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
    vae_latents_name: Optional[str] = None  # official: latents_path defaults to <data_dir>/<vae_latents_name>
    demo_dataset: bool = False  # generate the embedded demo dataset and train on it
    resolution: int = 256
    batch_size: int = 256  # GLOBAL batch (all ranks, one micro-step)
    num_workers: int = 4
    data_loader: str = "auto"  # auto | dali | torch
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
    distributed: str = "auto"  # auto | single | ddp | deepspeed
    deepspeed_config: Optional[str] = None  # JSON template; None = configs/deepspeed/zero2_<precision>.json
    zero_stage: Optional[int] = None  # overrides the template's stage
    fused_ops: bool = False  # Triton kernels (CUDA); the reference PyTorch path otherwise
    attention: str = "sdpa"  # sdpa | flash_attn | xformers | math: the attention kernel
    channels_last: bool = False
    compile: bool = False
    grad_checkpointing: str = ""  # comma list of: sit, vae (activation checkpointing per block)
    sync_discriminator_bn: bool = False  # global-batch BN in the discriminator (the official D uses per-rank statistics)
    device: Optional[str] = None  # default: cuda:<local_rank> when available, else cpu
    dist_timeout: int = 600  # s: collective timeout, and how long a silent peer rank is waited for

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
                      qk_norm=self.qk_norm, fused_attn=self.fused_attn, attention=self.attention,
                      fused_ops=self.fused_ops)
        kwargs.update(self.model_overrides)
        return kwargs

    def learning_rates(self) -> Dict[str, float]:
        """Per trained model (the backend's names), its optimizer's learning rate."""
        return {"sit": self.learning_rate, "vae": self.vae_learning_rate, "vae_loss": self.disc_learning_rate}

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
    "distributed": ("auto", "single", "ddp", "deepspeed"),
    "data_loader": ("auto", "dali", "torch"),
    "attention": ("sdpa", "flash_attn", "xformers", "math"),
    "vae": tuple(VAE_LAYOUTS),
}
# Keys (and their flags) renamed so that "backend" names only the training-backend object.
# An old name is refused with one line naming the new one; a saved config is read with the new.
RENAMED_KEYS = {"backend": "distributed", "data_backend": "data_loader", "attn_backend": "attention"}


# Allowed numeric ranges: name -> (low, high, low included, high included); None = unbounded.
RANGES = {
    **{name: (1, None, True, False) for name in (
        "batch_size", "max_train_steps", "epochs", "gradient_accumulation_steps", "checkpointing_steps",
        "sampling_steps", "keep_last_checkpoints", "num_classes", "resolution", "log_every",
        "max_consecutive_faults", "vae_ch", "sample_grid_size", "sample_num_steps")},
    **{name: (0, None, False, False) for name in (
        "learning_rate", "vae_learning_rate", "disc_learning_rate", "max_grad_norm", "adam_epsilon")},
    **{name: (0, None, True, False) for name in (
        "num_workers", "proj_coeff", "vae_align_proj_coeff", "adam_weight_decay", "sample_cfg_scale")},
    "cfg_prob": (0, 1, True, False),
    "ema_decay": (0, 1, True, True),
    "adam_beta1": (0, 1, True, False),
    "adam_beta2": (0, 1, True, False),
    "bn_momentum": (0, 1, True, True),
    "resume_step": (0, None, True, False),
    "dist_timeout": (1, None, True, False),
}
REPORT_TARGETS = ("jsonl", "tensorboard", "wandb")
GRAD_CHECKPOINT_TARGETS = ("sit", "vae")
TYPE_HINTS = get_type_hints(TrainConfig)


def _did_you_mean(key: str, names=None) -> str:
    close = difflib.get_close_matches(key, list(FIELDS if names is None else names), n=1)
    return f" (did you mean '{close[0]}'?)" if close else ""


def _range_text(low, high, low_in, high_in) -> str:
    if high is None:
        return f"{'>=' if low_in else '>'} {low}"
    return f"in {'[' if low_in else '('}{low}, {high}{']' if high_in else ')'}"


def _in_range(value, low, high, low_in, high_in) -> bool:
    above = value >= low if low_in else value > low
    below = high is None or (value <= high if high_in else value < high)
    return above and below


def check_type(name: str, value: Any, hint: Any) -> Any:
    """``value`` as the type ``hint`` names, or ``ConfigError``. No lossy coercion: a float or
    bool is not an int, a number is not a string; numbers written as strings are accepted
    (YAML reads ``1e-4`` as a string, and flags arrive as strings)."""
    if get_origin(hint) is Union:  # Optional[X]
        if value is None:
            return None
        hint = next(arg for arg in get_args(hint) if arg is not type(None))
    origin = get_origin(hint) or hint

    def fail(what: str):
        raise ConfigError(f"{name} must be {what}, got {value!r} ({type(value).__name__})")

    if origin is bool:
        if isinstance(value, bool):
            return value
        try:
            return _parse_bool(value) if isinstance(value, str) else fail("true or false")
        except argparse.ArgumentTypeError:
            fail("true or false")
    if origin is int:
        if isinstance(value, str) and value.strip().lstrip("+-").isdigit():
            return int(value)
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        fail("an integer")
    if origin is float:
        if isinstance(value, bool) or not isinstance(value, (int, float, str)):
            fail("a number")
        try:
            number = float(value)
        except ValueError:
            fail("a number")
        return number if math.isfinite(number) else fail("a finite number")
    if origin is str:
        return value if isinstance(value, str) else fail("a string (quote it in YAML)")
    if origin is dict:
        return value if isinstance(value, dict) else fail("a mapping, e.g. {depth: 2}")
    if origin in (list, collections.abc.Sequence):
        if isinstance(value, (list, tuple)):
            return list(value)
        fail("a list")
    return value


def sit_override_names() -> Dict[str, Any]:
    """The SiT constructor arguments ``model_overrides`` may set, with their type hints."""
    from .models.sit import SiT

    parameters = inspect.signature(SiT.__init__).parameters
    hints = get_type_hints(SiT.__init__)
    return {name: hints.get(name, Any) for name, p in parameters.items()
            if name != "self" and p.kind is not inspect.Parameter.VAR_KEYWORD}


def check_model_overrides(overrides: Dict[str, Any]) -> Dict[str, Any]:
    valid = sit_override_names()
    for key, value in overrides.items():
        if key not in valid:
            raise ConfigError(f"model_overrides: unknown SiT argument '{key}'{_did_you_mean(str(key), valid)}; "
                              f"valid: {', '.join(valid)}")
        overrides[key] = check_type(f"model_overrides.{key}", value, valid[key])
    return overrides


def load_yaml(path: str) -> Dict[str, Any]:
    if not os.path.isfile(path):
        raise ConfigError(f"config file not found: {path}")
    try:
        with open(path, encoding="utf-8") as handle:
            values = yaml.safe_load(handle) or {}
    except OSError as error:
        raise ConfigError(f"cannot read config file {path}: {error.strerror or error}") from None
    except (yaml.YAMLError, UnicodeDecodeError) as error:
        # YAML errors span several lines (with a caret under the spot): keep one.
        raise ConfigError(f"{path} is not valid YAML: {' '.join(str(error).split())}") from None
    if not isinstance(values, dict):
        raise ConfigError(f"{path} must hold a mapping of config keys, got {type(values).__name__}")
    result = {}
    for key, value in values.items():
        name = str(key).replace("-", "_")
        check_renamed(name, f" (in {path})")
        if name not in FIELDS:
            raise ConfigError(f"unknown config key '{key}' in {path}{_did_you_mean(name)}")
        result[name] = value
    return result


def check_renamed(name: str, where: str = "") -> None:
    if name in RENAMED_KEYS:
        raise ConfigError(f"config key '{name}' was renamed to '{RENAMED_KEYS[name]}'{where}")


def with_renamed_keys(saved: Dict[str, Any]) -> Dict[str, Any]:
    """A config saved by an older version (a checkpoint's trainer.pt) under today's key names."""
    return {RENAMED_KEYS.get(key, key): value for key, value in saved.items()}


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
    for old in RENAMED_KEYS:  # caught, so that the refusal is one line naming the new flag
        parser.add_argument("--" + old.replace("_", "-"), dest="renamed_" + old, default=argparse.SUPPRESS,
                            help=argparse.SUPPRESS)
    for name, f in FIELDS.items():
        flag = "--" + name.replace("_", "-")
        default_type = type(f.default) if f.default is not None and f.default is not dataclasses.MISSING else str
        if name == "model_overrides":
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
    for old in RENAMED_KEYS:
        if hasattr(args, "renamed_" + old):
            raise ConfigError(f"flag --{old.replace('_', '-')} was renamed to --{RENAMED_KEYS[old].replace('_', '-')}")
    values: Dict[str, Any] = load_yaml(args.config) if args.config else {}
    for name in FIELDS:
        if hasattr(args, name):
            values[name] = getattr(args, name)
    return make_config(values), args.local_rank


def make_config(values: Dict[str, Any]) -> TrainConfig:
    for name in values:
        check_renamed(name)
    unknown = [k for k in values if k not in FIELDS]
    if unknown:
        raise ConfigError(f"unknown config key '{unknown[0]}'{_did_you_mean(unknown[0])}")
    coerced = {}
    for name, value in values.items():
        if isinstance(value, str) and value.lower() in ("none", "null") and "Optional" in str(FIELDS[name].type):
            value = None  # --vae-ckpt none
        coerced[name] = check_type(name, value, TYPE_HINTS[name])
    if coerced.get("model_overrides"):
        check_model_overrides(coerced["model_overrides"])
    config = TrainConfig(**coerced)
    if config.vae_latents_name and not config.latents_path:  # the official train_ldm_only.py layout
        ours = os.path.join(config.data_dir, config.vae_latents_name)
        official = ours + ".h5"  # the official cache_latents.py output, read as it is
        config.latents_path = official if os.path.isfile(official) and not os.path.isdir(ours) else ours
    validate_values(config)
    validate_environment(config)
    return config


def validate_values(config: TrainConfig) -> None:
    """Values and combinations; no file access."""
    for name, choices in CHOICES.items():
        if getattr(config, name) not in choices:
            raise ConfigError(f"{name} must be one of {list(choices)}, got {getattr(config, name)!r}")
    if not isinstance(config.model_overrides, dict):
        raise ConfigError(f"model_overrides must be a mapping of SiT constructor arguments, got "
                          f"{config.model_overrides!r} ({type(config.model_overrides).__name__})")
    try:
        kwargs = config.sit_kwargs()
    except ValueError as error:
        raise ConfigError(str(error)) from None
    for name, bounds in RANGES.items():
        value = getattr(config, name)
        if value is not None and not _in_range(value, *bounds):
            raise ConfigError(f"{name} must be {_range_text(*bounds)}, got {value}")
    targets = [t.strip() for t in config.report_to.split(",") if t.strip()]
    unknown = [t for t in targets if t not in REPORT_TARGETS]
    if unknown or not targets:
        raise ConfigError(f"report_to must be a comma list of {', '.join(REPORT_TARGETS)}, got {config.report_to!r}")
    if not config.fused_attn and config.attention not in ("sdpa", "math"):
        raise ConfigError(f"--no-fused-attn (the explicit attention formula) conflicts with attention "
                          f"{config.attention!r}, a fused kernel")
    checkpointed = [t.strip() for t in config.grad_checkpointing.split(",") if t.strip()]
    if any(t not in GRAD_CHECKPOINT_TARGETS for t in checkpointed):
        raise ConfigError(f"grad_checkpointing must be a comma list of {', '.join(GRAD_CHECKPOINT_TARGETS)}, "
                          f"got {config.grad_checkpointing!r}")
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
    from .models.encoders import parse_enc_type

    try:
        parse_enc_type(config.enc_type, config.resolution)
    except ValueError as error:
        raise ConfigError(str(error)) from None


def validate_environment(config: TrainConfig) -> None:
    """What this machine must offer: the device and the attention package."""
    import torch

    from .models.attention import check_attention_kernel

    if config.device is not None:
        try:
            device = torch.device(config.device)
        except RuntimeError:
            raise ConfigError(f"device must be 'cpu', 'cuda' or 'cuda:N', got {config.device!r}") from None
        if device.type == "cuda":
            count = torch.cuda.device_count() if torch.cuda.is_available() else 0
            if count == 0:
                raise ConfigError(f"device {config.device!r} asked but CUDA is not available on this machine "
                                  "(use device: cpu, or leave device unset)")
            if device.index is not None and device.index >= count:
                raise ConfigError(f"device {config.device!r} asked but this machine has {count} CUDA device(s)")
        elif device.type != "cpu":
            raise ConfigError(f"device must be 'cpu', 'cuda' or 'cuda:N', got {config.device!r}")
    try:
        check_attention_kernel(config.attention)
    except ValueError as error:
        raise ConfigError(str(error)) from None


def validate_world(config: TrainConfig, world_size: int) -> int:
    """Per-rank micro-batch size for ``world_size`` ranks."""
    per_step = world_size * config.gradient_accumulation_steps
    if config.batch_size % per_step:
        raise ConfigError(f"batch_size {config.batch_size} must be divisible by world_size x "
                          f"gradient_accumulation_steps = {world_size} x {config.gradient_accumulation_steps}")
    return config.batch_size // per_step


def resolve_resume_step(config: TrainConfig) -> None:
    """The official ``--resume-step N [--continue-train-exp-dir DIR]`` (DIR: default this run's
    folder): our checkpoint ``DIR/checkpoints/<N:07d>/`` is resumed exactly (``resume``); an
    official run's single file ``DIR/checkpoints/<N:07d>.pt`` starts the run as ``init_from``
    (weights, Adam states, step: all the official file holds)."""
    if not config.resume_step:
        if config.continue_train_exp_dir and not (config.init_from or config.resume):  # not yet resolved
            raise ConfigError("continue_train_exp_dir needs resume_step (the checkpoint's step in that directory)")
        return
    if config.resume:
        return  # --resume names the checkpoint itself
    directory = Path(config.continue_train_exp_dir or config.experiment_dir) / "checkpoints"
    ours, official = directory / f"{config.resume_step:07d}", directory / f"{config.resume_step:07d}.pt"
    if ours.is_dir():
        config.resume = str(ours)
    elif official.is_file():
        if config.init_from:
            raise ConfigError(f"resume_step {config.resume_step} ({official}) and init_from {config.init_from} both "
                              "name a starting point: give one")
        config.init_from, config.resume_step = str(official), 0
    else:
        raise ConfigError(f"resume_step {config.resume_step}: neither {ours}/ nor {official} exists")


def validate_files(config: TrainConfig) -> None:
    """Every file the run will read, checked up front."""
    resolve_resume_step(config)
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
                 f" ({spec.source}; or allow_random_encoder: true for a demo)")
