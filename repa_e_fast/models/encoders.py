"""Frozen representation encoders for REPA (docs/models.md#encoders), read from
LOCAL files in ``pretrained/`` (nothing is downloaded):

| ``enc_type``                 | file in ``pretrained/``                 | REPA target                     |
|------------------------------|-----------------------------------------|---------------------------------|
| ``dinov2-vit-{s,b,l,g}``     | ``dinov2_vit{s,b,l,g}14_pretrain.pth``  | final-norm patch tokens         |
| ``dinov2reg-vit-{s,b,l,g}``  | ``dinov2_vit{s,b,l,g}14_reg4_pretrain.pth`` | final-norm patch tokens     |
| ``mocov3-vit-{s,b,l}``       | ``mocov3_vit{s,b,l}.pth``               | final-norm tokens without cls   |
| ``mae-vit-l``                | ``mae_vitl.pth``                        | tokens without cls, NO final norm |
| ``jepa-vit-h``               | ``ijepa_vith.pth``                      | final-norm tokens (no cls)      |
| ``clip-vit-L``               | ``ViT-L-14.pt``                         | tokens without cls, NO ln_post/proj |

Each family has its own image preprocessing (``preprocess_raw_image``,
docs/numerics.md#encoder-preprocessing-per-family). Several encoders are given comma-separated
(``dinov2-vit-b,clip-vit-L``). The official loader
supports the non-DINOv2 families only at 256 px; here their position tables are resampled
to the res/16 token grid like DINOv2's, so other resolutions work too.
"""

import math
import os
import warnings
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from .checkpoints import load_state_dict_strict
from .encoder_checkpoints import official_to_state_dict, read_official_checkpoint
from .vit import DinoVisionTransformer, LayerScale, SwiGLU, VisionTransformer, resample_pos_embed  # noqa: F401

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

# config letter -> (embed_dim, depth, heads, ffn)
DINOV2_ARCHS = {
    "s": (384, 12, 6, "mlp"),
    "b": (768, 12, 12, "mlp"),
    "l": (1024, 24, 16, "mlp"),
    "g": (1536, 40, 24, "swiglu"),
}
# family -> config letter -> (embed_dim, depth, heads); the patch size is per family.
FAMILY_ARCHS = {
    "mocov3": {"s": (384, 12, 12), "b": (768, 12, 12), "l": (1024, 24, 16)},
    "mae": {"l": (1024, 24, 16)},
    "jepa": {"h": (1280, 32, 16)},
    "clip": {"l": (1024, 24, 16)},  # heads = width // 64
}
PATCH_SIZES = {"dinov2": 14, "mocov3": 16, "mae": 16, "jepa": 14, "clip": 14}

# Names the official code accepts but cannot run, one clear line each
# (docs/numerics.md#encoder-names-the-official-code-cannot-run).
UNSUPPORTED_FAMILIES = {
    "dinov1": "the official REPA-E cannot run DINOv1: load_encoders imports models/dinov1.py, which is not "
              "in the repository (ImportError)",
}


def encoder_family(encoder_type: str) -> str:
    """The preprocessing/loading family of an ``enc_type`` prefix, tested in the official
    order (docs/numerics.md#encoder-preprocessing-per-family): clip, mocov3 or mae, dinov2, dinov1, jepa."""
    for family in ("clip", "mocov3", "mae", "dinov2", "dinov1", "jepa"):
        if family in encoder_type:
            return family
    raise ValueError(f"unknown encoder type {encoder_type!r}; supported: dinov2, dinov2reg, mocov3, mae, jepa, clip")


# ----------------------------------------------------------------------------------------
# enc_type strings
# ----------------------------------------------------------------------------------------
@dataclass
class EncoderSpec:
    encoder_type: str  # "dinov2", "dinov2reg", "mocov3", "mae", "jepa", "clip"
    architecture: str  # "vit"
    config: str  # size letter, lower case: "s", "b", "l", "g", "h"

    @property
    def family(self) -> str:
        return encoder_family(self.encoder_type)

    @property
    def registers(self) -> int:
        return 4 if self.family == "dinov2" and "reg" in self.encoder_type else 0

    @property
    def embed_dim(self) -> int:
        """The SiT projector width for this encoder (z_dim)."""
        if self.family == "dinov2":
            return DINOV2_ARCHS[self.config][0]
        return FAMILY_ARCHS[self.family][self.config][0]

    @property
    def hub_name(self) -> str:
        """DINOv2's torch.hub entry (DINOv2 only)."""
        return f"dinov2_vit{self.config}14" + ("_reg" if self.registers else "")

    @property
    def checkpoint_name(self) -> str:
        """The file name in ``pretrained/`` (the official ``ckpts/`` names)."""
        family = self.family
        if family == "dinov2":
            return f"dinov2_vit{self.config}14" + ("_reg4" if self.registers else "") + "_pretrain.pth"
        if family == "clip":
            return "ViT-L-14.pt"
        return {"mocov3": "mocov3_vit{}.pth", "mae": "mae_vit{}.pth", "jepa": "ijepa_vit{}.pth"}[family].format(self.config)

    @property
    def source(self) -> str:
        """Where the file comes from, for error messages."""
        family = self.family
        if family == "dinov2":
            return f"the weights of DINOv2's torch.hub entry '{self.hub_name}' (facebookresearch/dinov2)"
        if family == "mocov3":
            return (f"a MoCo v3 ViT-{self.config.upper()}/16 checkpoint in its training layout "
                    "({'state_dict': module.base_encoder.*}, e.g. facebookresearch/moco-v3's vit-b-300ep.pth.tar), "
                    f"which REPA-E reads as ckpts/{self.checkpoint_name}")
        if family == "mae":
            return ("the MAE ViT-L/16 encoder facebookresearch/mae publishes as mae_pretrain_vit_large.pth, "
                    "which REPA-E reads as ckpts/mae_vitl.pth")
        if family == "jepa":
            return ("the I-JEPA ViT-H/14 checkpoint facebookresearch/ijepa publishes as IN1K-vit.h.14-300e.pth.tar, "
                    "which REPA-E reads as ckpts/ijepa_vith.pth")
        return "the file openai/CLIP's clip.load('ViT-L/14') downloads into ~/.cache/clip"

    def __str__(self) -> str:
        config = self.config.upper() if self.family == "clip" else self.config
        return f"{self.encoder_type}-{self.architecture}-{config}"


def _parse_one(entry: str) -> EncoderSpec:
    parts = entry.strip().split("-")
    if len(parts) != 3:
        raise ValueError(f"encoder type {entry!r} must look like 'dinov2-vit-b' (type-arch-config)")
    encoder_type, architecture, config = parts
    family = encoder_family(encoder_type)
    if family in UNSUPPORTED_FAMILIES:
        raise ValueError(f"{entry}: {UNSUPPORTED_FAMILIES[family]}")
    config = config.lower()
    if family == "mocov3" and architecture == "resnet":
        raise ValueError(f"{entry}: MoCo v3 ResNets are not implemented in the official REPA-E either "
                         "(NotImplementedError); use mocov3-vit-s, mocov3-vit-b or mocov3-vit-l")
    if architecture != "vit":
        raise ValueError(f"{entry}: only ViT encoders exist ('{encoder_type}-vit-...')")
    if family == "clip" and config != "l":
        raise ValueError(f"{entry}: only clip-vit-L works; the official loader asks clip.load for "
                         f"'ViT-{parts[2]}/14', a model openai/CLIP does not have")
    if family == "dinov2":
        if config not in DINOV2_ARCHS:
            raise ValueError(f"unknown DINOv2 architecture {entry!r}; use vit-s, vit-b, vit-l or vit-g")
    elif config not in FAMILY_ARCHS[family]:
        known = ", ".join(f"{family}-vit-{c.upper() if family == 'clip' else c}" for c in FAMILY_ARCHS[family])
        builds = {"mae": " (the official loader always builds MAE ViT-L/16)",
                  "jepa": " (the official loader always builds I-JEPA ViT-H/14)"}.get(family, "")
        raise ValueError(f"unknown {family} size {entry!r}; use {known}{builds}")
    return EncoderSpec(encoder_type, architecture, config)


def parse_enc_type(enc_type: str, resolution: int = 256) -> List[EncoderSpec]:
    """'dinov2-vit-b' or a comma-separated list -> specs; rejects what we cannot build."""
    specs = [_parse_one(entry) for entry in enc_type.split(",")]
    if resolution % 16 or resolution < 32:
        raise ValueError(f"resolution must be a multiple of 16 (>= 32) for the encoder targets, got {resolution}")
    return specs


# ----------------------------------------------------------------------------------------
# Preprocessing (docs/numerics.md#encoder-preprocessing-per-family)
# ----------------------------------------------------------------------------------------
def _normalize(x: torch.Tensor, mean: Tuple[float, ...], std: Tuple[float, ...]) -> torch.Tensor:
    mean_t = torch.tensor(mean, device=x.device).view(1, 3, 1, 1)
    std_t = torch.tensor(std, device=x.device).view(1, 3, 1, 1)
    return (x - mean_t) / std_t  # a division, as torchvision's Normalize


def preprocess_raw_image(images: torch.Tensor, encoder_type: str, resolution: int = 256) -> torch.Tensor:
    """uint8 [N,3,H,W] -> encoder input, per family (docs/numerics.md#encoder-preprocessing-per-family):

    - MoCo v3, MAE: /255, ImageNet normalisation, no resize.
    - DINOv2, I-JEPA: /255, ImageNet normalisation, THEN bicubic resize to 224*(res//256).
    - CLIP: /255, bicubic resize FIRST, then CLIP normalisation.

    The resize (no antialias, align_corners False, no clamping) goes to 14*(res//16), which
    is 224 at 256 px and keeps one encoder token per SiT token at small test resolutions.
    """
    if images.dtype != torch.uint8:
        raise TypeError(f"expected uint8 images, got {images.dtype}")
    family = encoder_family(encoder_type)
    if family in UNSUPPORTED_FAMILIES:
        raise ValueError(f"no preprocessing for {encoder_type!r}: {UNSUPPORTED_FAMILIES[family]}")
    size = 14 * (resolution // 16)
    x = images.float() / 255.0
    if family == "clip":
        return _normalize(F.interpolate(x, size, mode="bicubic"), CLIP_MEAN, CLIP_STD)
    x = _normalize(x, IMAGENET_MEAN, IMAGENET_STD)
    if family in ("mocov3", "mae"):
        return x
    return F.interpolate(x, size, mode="bicubic")


# ----------------------------------------------------------------------------------------
# Building and loading
# ----------------------------------------------------------------------------------------
def build_backbone(family: str, embed_dim: int, depth: int, num_heads: int, grid: int, ffn: str = "mlp",
                   num_register_tokens: int = 0, attention: str = "sdpa") -> VisionTransformer:
    """One family's ViT with the given sizes; ``grid`` = the stored position grid."""
    patch = PATCH_SIZES[family]
    if family == "dinov2":
        return DinoVisionTransformer(embed_dim, depth, num_heads, ffn, patch, num_register_tokens, grid, attention)
    options = {
        "mocov3": {},
        "mae": {"target_final_norm": False},  # norm.* loaded, not applied (docs/numerics.md#encoder-targets)
        "jepa": {"cls_token": False},
        # conv1 without bias, ln_pre, QuickGELU, LayerNorm eps 1e-5; ln_post loaded as
        # `norm` but not applied (docs/numerics.md#encoder-targets)
        "clip": {"activation": "quick_gelu", "norm_eps": 1e-5, "patch_bias": False, "pre_norm": True,
                 "target_final_norm": False},
    }[family]
    return VisionTransformer(embed_dim, depth, num_heads, patch, grid, attention=attention, **options)


def build_encoder_backbone(spec: EncoderSpec, grid: int = 16, attention: str = "sdpa") -> VisionTransformer:
    """The full-size backbone of ``spec`` (random weights)."""
    if spec.family == "dinov2":
        return build_dinov2(spec, grid, attention)
    dim, depth, heads = FAMILY_ARCHS[spec.family][spec.config]
    return build_backbone(spec.family, dim, depth, heads, grid, attention=attention)


def build_dinov2(spec: EncoderSpec, grid: int = 37, attention: str = "sdpa") -> DinoVisionTransformer:
    dim, depth, heads, ffn = DINOV2_ARCHS[spec.config]
    return DinoVisionTransformer(dim, depth, heads, ffn, 14, spec.registers, grid, attention)


def _stored_grid(model: VisionTransformer) -> int:
    return math.isqrt(model.pos_embed.shape[1] - int(model.has_cls_token))


def load_official_state_dict(model: VisionTransformer, family: str, raw: dict, name: str) -> None:
    """Map what the official loader reads (``raw``) onto ``model`` and load it strictly."""
    load_state_dict_strict(model, official_to_state_dict(family, raw, _stored_grid(model), name), name)


def load_dinov2_state_dict(model: DinoVisionTransformer, state_dict: Dict[str, torch.Tensor], name: str) -> None:
    """Load a hub-layout state dict (any position grid; resampled to the model's grid) strictly."""
    load_official_state_dict(model, "dinov2", state_dict, name)


class RepresentationEncoder(nn.Module):
    """A frozen encoder plus its preprocessing: raw uint8 images -> REPA target [N, T, D]."""

    def __init__(self, spec: EncoderSpec, backbone: VisionTransformer, resolution: int = 256):
        super().__init__()
        self.spec = spec
        self.resolution = resolution
        self.backbone = backbone
        self.embed_dim = backbone.embed_dim

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = preprocess_raw_image(images, self.spec.encoder_type, self.resolution)
        return self.backbone.repa_target(x)


def load_encoders(
    enc_type: str,
    resolution: int = 256,
    checkpoint_paths: Optional[Sequence[Optional[str]]] = None,
    pretrained_dir: str = "pretrained",
    allow_random: bool = False,
    device: Optional[torch.device] = None,
    attention: str = "sdpa",
) -> List[RepresentationEncoder]:
    """Build the encoders of ``enc_type`` from LOCAL checkpoints; nothing is downloaded.

    For each encoder the file is ``checkpoint_paths[i]`` if given, else
    ``<pretrained_dir>/<spec.checkpoint_name>`` (the table in this module's docstring), in
    the layout the official loader reads. ``allow_random=True`` (the demo only) builds
    randomly initialised encoders when the file is missing and warns loudly.
    """
    specs = parse_enc_type(enc_type, resolution)
    if checkpoint_paths is not None and len(checkpoint_paths) != len(specs):
        raise ValueError(f"{len(specs)} encoders in {enc_type!r} but {len(checkpoint_paths)} checkpoint paths")
    paths = []
    for index, spec in enumerate(specs):  # every file checked before any model is built
        path = checkpoint_paths[index] if checkpoint_paths and checkpoint_paths[index] else None
        path = path or os.path.join(pretrained_dir, spec.checkpoint_name)
        if not os.path.isfile(path) and not allow_random:
            raise FileNotFoundError(
                f"encoder checkpoint for {spec} not found: {path}. Get '{spec.checkpoint_name}' "
                f"({spec.source}) and put it there or pass its path explicitly."
            )
        paths.append(path)
    grid = resolution // 16  # 16x16 at 256 px, 32x32 at 512 px
    encoders = []
    for spec, path in zip(specs, paths):
        backbone = build_encoder_backbone(spec, grid=grid, attention=attention)
        if os.path.isfile(path):
            load_official_state_dict(backbone, spec.family, read_official_checkpoint(path), f"{spec} encoder ({path})")
        else:
            warnings.warn(
                "\n" + "!" * 88 + f"\n!! {spec}: no checkpoint at {path}; using RANDOM encoder weights.\n"
                "!! REPA targets are then meaningless; this is only acceptable for the demo.\n" + "!" * 88,
                stacklevel=2,
            )
        encoder = RepresentationEncoder(spec, backbone, resolution).eval().requires_grad_(False)
        encoders.append(encoder.to(device) if device is not None else encoder)
    return encoders
