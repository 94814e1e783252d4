"""Frozen representation encoders for REPA (spec §7): DINOv2 ViT-S/B/L/G/14, with and
without registers, in the hub checkpoint layout (``dinov2_vitb14_pretrain.pth`` etc.).

REPA-E resamples the 37x37 position table of the hub checkpoints once at load time to the
token grid of the training resolution (16x16 at 256 px, 32x32 at 512 px; R35), and
preprocesses raw uint8 images per encoder type (R36). Other encoder families of the
official code (MoCo v3, CLIP, MAE, I-JEPA) are not implemented here.
"""

import math
import os
import warnings
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from .attention import multi_head_attention

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# config letter -> (embed_dim, depth, heads, ffn)
DINOV2_ARCHS = {
    "s": (384, 12, 6, "mlp"),
    "b": (768, 12, 12, "mlp"),
    "l": (1024, 24, 16, "mlp"),
    "g": (1536, 40, 24, "swiglu"),
}


class LayerScale(nn.Module):
    def __init__(self, dim: int, init_values: float = 1.0):
        super().__init__()
        self.gamma = nn.Parameter(torch.full((dim,), float(init_values)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gamma


class DinoAttention(nn.Module):
    def __init__(self, dim: int, num_heads: int, backend: str = "sdpa"):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=True)
        self.proj = nn.Linear(dim, dim, bias=True)
        self.backend = backend

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, tokens, dim = x.shape
        qkv = self.qkv(x).reshape(batch, tokens, 3, self.num_heads, dim // self.num_heads).permute(2, 0, 3, 1, 4)
        out = multi_head_attention(qkv[0], qkv[1], qkv[2], self.backend)
        return self.proj(out.transpose(1, 2).reshape(batch, tokens, dim))


class DinoMlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()  # exact (erf) GELU
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class SwiGLU(nn.Module):
    """ViT-g FFN: w12 -> halves (a, b) -> silu(a) * b -> w3. Hidden width rounded as DINOv2
    does: int(4D * 2/3) rounded up to a multiple of 8 (4096 for D=1536)."""

    def __init__(self, dim: int, mlp_ratio: float = 4.0):
        super().__init__()
        hidden = (int(dim * mlp_ratio * 2 / 3) + 7) // 8 * 8
        self.w12 = nn.Linear(dim, 2 * hidden)
        self.w3 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b = self.w12(x).chunk(2, dim=-1)
        return self.w3(F.silu(a) * b)


class DinoBlock(nn.Module):
    def __init__(self, dim: int, num_heads: int, ffn: str, backend: str):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = DinoAttention(dim, num_heads, backend)
        self.ls1 = LayerScale(dim)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = SwiGLU(dim) if ffn == "swiglu" else DinoMlp(dim, 4 * dim)
        self.ls2 = LayerScale(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.ls1(self.attn(self.norm1(x)))
        return x + self.ls2(self.mlp(self.norm2(x)))


class DinoPatchEmbed(nn.Module):
    def __init__(self, patch_size: int, dim: int):
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv2d(3, dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)


def resample_pos_embed(pos_embed: torch.Tensor, grid: int, num_prefix_tokens: int = 1) -> torch.Tensor:
    """Resize the square patch part of a [1, P + S*S, D] table to grid x grid (R35): prefix
    kept, patches resized row-major with antialiased bicubic in float32."""
    prefix, patches = pos_embed[:, :num_prefix_tokens], pos_embed[:, num_prefix_tokens:]
    old = math.isqrt(patches.shape[1])
    if old * old != patches.shape[1]:
        raise ValueError(f"position table with {patches.shape[1]} patch entries is not square")
    if old == grid:
        return pos_embed
    dim = patches.shape[-1]
    image = patches.float().reshape(1, old, old, dim).permute(0, 3, 1, 2)
    image = F.interpolate(image, size=(grid, grid), mode="bicubic", antialias=True, align_corners=False)
    patches = image.permute(0, 2, 3, 1).reshape(1, grid * grid, dim).to(pos_embed.dtype)
    return torch.cat([prefix, patches], dim=1)


class DinoVisionTransformer(nn.Module):
    """DINOv2 backbone (no head), key-compatible with the hub checkpoints.

    ``grid`` is the size of the stored position grid (37 for the hub's 518 px training
    size, 16 after REPA-E's resampling for 256 px).
    """

    def __init__(
        self,
        embed_dim: int = 768,
        depth: int = 12,
        num_heads: int = 12,
        ffn: str = "mlp",
        patch_size: int = 14,
        num_register_tokens: int = 0,
        grid: int = 37,
        attn_backend: str = "sdpa",
    ):
        super().__init__()
        self.embed_dim = embed_dim
        self.patch_size = patch_size
        self.num_register_tokens = num_register_tokens
        # Runtime interpolation, only used when an input's grid differs from the stored one.
        self.interpolate_antialias = num_register_tokens > 0
        self.interpolate_offset = 0.0 if num_register_tokens > 0 else 0.1
        self.patch_embed = DinoPatchEmbed(patch_size, embed_dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + grid * grid, embed_dim))
        if num_register_tokens:
            self.register_tokens = nn.Parameter(torch.zeros(1, num_register_tokens, embed_dim))
        self.mask_token = nn.Parameter(torch.zeros(1, embed_dim))  # in every checkpoint, unused here
        self.blocks = nn.ModuleList([DinoBlock(embed_dim, num_heads, ffn, attn_backend) for _ in range(depth)])
        self.norm = nn.LayerNorm(embed_dim, eps=1e-6)
        self.head = nn.Identity()

    def position_embedding(self, grid_h: int, grid_w: int) -> torch.Tensor:
        stored = math.isqrt(self.pos_embed.shape[1] - 1)
        if grid_h == stored and grid_w == stored:
            return self.pos_embed
        # DINOv2's own run-time interpolation (never reached by REPA-E at 224/448 px input).
        table = self.pos_embed.float()
        patches = table[:, 1:].reshape(1, stored, stored, -1).permute(0, 3, 1, 2)
        if self.interpolate_offset:
            scale = ((grid_h + self.interpolate_offset) / stored, (grid_w + self.interpolate_offset) / stored)
            patches = F.interpolate(patches, scale_factor=scale, mode="bicubic", antialias=self.interpolate_antialias)
        else:
            patches = F.interpolate(patches, size=(grid_h, grid_w), mode="bicubic", antialias=self.interpolate_antialias)
        patches = patches.permute(0, 2, 3, 1).reshape(1, grid_h * grid_w, -1)
        return torch.cat([table[:, :1], patches], dim=1).to(self.pos_embed.dtype)

    def forward_features(self, x: torch.Tensor) -> Dict[str, torch.Tensor]:
        batch, _, height, width = x.shape
        tokens = self.patch_embed(x)
        tokens = torch.cat([self.cls_token.expand(batch, -1, -1), tokens], dim=1)
        tokens = tokens + self.position_embedding(height // self.patch_size, width // self.patch_size)
        if self.num_register_tokens:
            # Registers go right after cls and get no position embedding.
            tokens = torch.cat([tokens[:, :1], self.register_tokens.expand(batch, -1, -1), tokens[:, 1:]], dim=1)
        for block in self.blocks:
            tokens = block(tokens)
        normed = self.norm(tokens)
        first_patch = 1 + self.num_register_tokens
        return {
            "x_norm_clstoken": normed[:, 0],
            "x_norm_regtokens": normed[:, 1:first_patch],
            "x_norm_patchtokens": normed[:, first_patch:],
            "x_prenorm": tokens,
        }

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.forward_features(x)["x_norm_clstoken"])


# ----------------------------------------------------------------------------------------
# enc_type strings, preprocessing, loading
# ----------------------------------------------------------------------------------------
@dataclass
class EncoderSpec:
    encoder_type: str  # e.g. "dinov2" or "dinov2reg"
    architecture: str  # "vit"
    config: str  # "s", "b", "l", "g"

    @property
    def registers(self) -> int:
        return 4 if "reg" in self.encoder_type else 0

    @property
    def hub_name(self) -> str:
        return f"dinov2_vit{self.config}14" + ("_reg" if self.registers else "")

    @property
    def checkpoint_name(self) -> str:
        return f"dinov2_vit{self.config}14" + ("_reg4" if self.registers else "") + "_pretrain.pth"

    def __str__(self) -> str:
        return f"{self.encoder_type}-{self.architecture}-{self.config}"


def parse_enc_type(enc_type: str, resolution: int = 256) -> List[EncoderSpec]:
    """'dinov2-vit-b' or a comma-separated list -> specs; rejects what we cannot build."""
    specs = []
    for entry in enc_type.split(","):
        parts = entry.strip().split("-")
        if len(parts) != 3:
            raise ValueError(f"encoder type {entry!r} must look like 'dinov2-vit-b' (type-arch-config)")
        encoder_type, architecture, config = parts
        if not encoder_type.startswith("dinov2"):
            raise ValueError(
                f"encoder type {encoder_type!r} is not implemented (only DINOv2: 'dinov2-vit-{{s,b,l,g}}' "
                "and 'dinov2reg-vit-{s,b,l,g}')"
            )
        if architecture != "vit" or config.lower() not in DINOV2_ARCHS:
            raise ValueError(f"unknown DINOv2 architecture {entry!r}; use vit-s, vit-b, vit-l or vit-g")
        specs.append(EncoderSpec(encoder_type, architecture, config.lower()))
    if resolution % 16 or resolution < 32:
        raise ValueError(f"resolution must be a multiple of 16 (>= 32) for DINOv2 targets, got {resolution}")
    return specs


def preprocess_raw_image(images: torch.Tensor, encoder_type: str, resolution: int = 256) -> torch.Tensor:
    """uint8 [N,3,H,W] -> encoder input (R36): /255, ImageNet normalisation, THEN bicubic
    resize to 224*(res//256) (no antialias, align_corners False, no clamping). Written as
    14*(res//16), which is the same at 256 and 512 px and keeps one encoder token per SiT
    token at the small resolutions of the demo and the tests."""
    if images.dtype != torch.uint8:
        raise TypeError(f"expected uint8 images, got {images.dtype}")
    if not encoder_type.startswith("dinov2"):
        raise ValueError(f"no preprocessing defined for encoder type {encoder_type!r}")
    x = images.float() / 255.0
    mean = torch.tensor(IMAGENET_MEAN, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=x.device).view(1, 3, 1, 1)
    x = (x - mean) / std
    return F.interpolate(x, 14 * (resolution // 16), mode="bicubic")


class RepresentationEncoder(nn.Module):
    """A frozen encoder plus its preprocessing: raw uint8 images -> patch tokens [N, T, D]."""

    def __init__(self, spec: EncoderSpec, backbone: DinoVisionTransformer, resolution: int = 256):
        super().__init__()
        self.spec = spec
        self.resolution = resolution
        self.backbone = backbone
        self.embed_dim = backbone.embed_dim

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = preprocess_raw_image(images, self.spec.encoder_type, self.resolution)
        return self.backbone.forward_features(x)["x_norm_patchtokens"]


def build_dinov2(spec: EncoderSpec, grid: int = 37, attn_backend: str = "sdpa") -> DinoVisionTransformer:
    dim, depth, heads, ffn = DINOV2_ARCHS[spec.config]
    return DinoVisionTransformer(dim, depth, heads, ffn, 14, spec.registers, grid, attn_backend)


def load_dinov2_state_dict(model: DinoVisionTransformer, state_dict: Dict[str, torch.Tensor], name: str) -> None:
    """Load a hub-layout state dict (any position grid; resampled to the model's grid) strictly."""
    from .checkpoints import load_state_dict_strict

    state_dict = dict(state_dict)
    state_dict.pop("head.weight", None)
    state_dict.pop("head.bias", None)
    if "pos_embed" in state_dict:
        grid = math.isqrt(model.pos_embed.shape[1] - 1)
        state_dict["pos_embed"] = resample_pos_embed(state_dict["pos_embed"], grid)
    load_state_dict_strict(model, state_dict, name)


def load_encoders(
    enc_type: str,
    resolution: int = 256,
    checkpoint_paths: Optional[Sequence[Optional[str]]] = None,
    pretrained_dir: str = "pretrained",
    allow_random: bool = False,
    device: Optional[torch.device] = None,
    attn_backend: str = "sdpa",
) -> List[RepresentationEncoder]:
    """Build the encoders of ``enc_type`` from LOCAL checkpoints; nothing is downloaded.

    For each encoder the file is ``checkpoint_paths[i]`` if given, else
    ``<pretrained_dir>/<hub file name>`` (e.g. ``pretrained/dinov2_vitb14_pretrain.pth``,
    the file DINOv2's hub entry ``dinov2_vitb14`` downloads). ``allow_random=True`` (the demo
    only) builds randomly initialised encoders when the file is missing and warns loudly.
    """
    specs = parse_enc_type(enc_type, resolution)
    if checkpoint_paths is not None and len(checkpoint_paths) != len(specs):
        raise ValueError(f"{len(specs)} encoders in {enc_type!r} but {len(checkpoint_paths)} checkpoint paths")
    grid = resolution // 16  # 16x16 at 256 px, 32x32 at 512 px
    encoders = []
    for index, spec in enumerate(specs):
        path = checkpoint_paths[index] if checkpoint_paths and checkpoint_paths[index] else None
        path = path or os.path.join(pretrained_dir, spec.checkpoint_name)
        backbone = build_dinov2(spec, grid=grid, attn_backend=attn_backend)
        if os.path.isfile(path):
            from .checkpoints import load_state_dict_file

            load_dinov2_state_dict(backbone, load_state_dict_file(path), f"{spec} encoder ({path})")
        elif allow_random:
            warnings.warn(
                "\n" + "!" * 88 + f"\n!! {spec}: no checkpoint at {path}; using RANDOM encoder weights.\n"
                "!! REPA targets are then meaningless; this is only acceptable for the demo.\n" + "!" * 88,
                stacklevel=2,
            )
        else:
            raise FileNotFoundError(
                f"encoder checkpoint for {spec} not found: {path}. Download '{spec.checkpoint_name}' "
                f"(the weights of DINOv2's torch.hub entry '{spec.hub_name}', facebookresearch/dinov2) "
                f"and put it there or pass its path explicitly."
            )
        encoder = RepresentationEncoder(spec, backbone, resolution).eval().requires_grad_(False)
        encoders.append(encoder.to(device) if device is not None else encoder)
    return encoders
