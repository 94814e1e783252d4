"""The plain Vision Transformer behind every REPA target encoder (DINOv2, MoCo v3, MAE,
I-JEPA, CLIP), with the state-dict names of the timm / DINOv2 layout.

The families differ only in options: a cls token or none, register tokens, LayerScale,
the FFN (GELU, QuickGELU or SwiGLU), LayerNorm eps, a bias on the patch projection, a
LayerNorm before the blocks (CLIP's ``ln_pre``), and whether the REPA target takes the
final LayerNorm (MAE and CLIP load it but do not apply it). The official checkpoint
layouts are mapped onto these names by ``encoder_checkpoints``.
"""

import math
from typing import Dict

import torch
import torch.nn as nn
import torch.nn.functional as F

from .attention import Attention


class LayerScale(nn.Module):
    def __init__(self, dim: int, init_values: float = 1.0):
        super().__init__()
        self.gamma = nn.Parameter(torch.full((dim,), float(init_values)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gamma


class QuickGELU(nn.Module):
    """CLIP's activation: x * sigmoid(1.702 x)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(1.702 * x)


ACTIVATIONS = {"gelu": lambda: nn.GELU(), "quick_gelu": QuickGELU}  # gelu: exact (erf)


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int, activation: str = "gelu"):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = ACTIVATIONS[activation]()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class SwiGLU(nn.Module):
    """DINOv2 ViT-g FFN: w12 -> halves (a, b) -> silu(a) * b -> w3. Hidden width rounded as
    DINOv2 does: int(4D * 2/3) rounded up to a multiple of 8 (4096 for D=1536)."""

    def __init__(self, dim: int, mlp_ratio: float = 4.0):
        super().__init__()
        hidden = (int(dim * mlp_ratio * 2 / 3) + 7) // 8 * 8
        self.w12 = nn.Linear(dim, 2 * hidden)
        self.w3 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b = self.w12(x).chunk(2, dim=-1)
        return self.w3(F.silu(a) * b)


class Block(nn.Module):
    """Pre-norm transformer block: x + ls1(attn(norm1(x))), then x + ls2(mlp(norm2(x))).
    Without LayerScale ``ls1``/``ls2`` are identities (no state-dict entries)."""

    def __init__(self, dim: int, num_heads: int, ffn: str = "mlp", activation: str = "gelu", norm_eps: float = 1e-6,
                 layer_scale: bool = False, attention: str = "sdpa"):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=norm_eps)
        self.attn = Attention(dim, num_heads, qkv_bias=True, kernel=attention)
        self.ls1 = LayerScale(dim) if layer_scale else nn.Identity()
        self.norm2 = nn.LayerNorm(dim, eps=norm_eps)
        self.mlp = SwiGLU(dim) if ffn == "swiglu" else Mlp(dim, 4 * dim, activation)
        self.ls2 = LayerScale(dim) if layer_scale else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.ls1(self.attn(self.norm1(x)))
        return x + self.ls2(self.mlp(self.norm2(x)))


class PatchEmbed(nn.Module):
    """Non-overlapping conv patches, tokens in row-major order (token = row * grid + col)."""

    def __init__(self, patch_size: int, dim: int, bias: bool = True):
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv2d(3, dim, kernel_size=patch_size, stride=patch_size, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)


def resample_pos_embed(pos_embed: torch.Tensor, grid: int, num_prefix_tokens: int = 1) -> torch.Tensor:
    """Resize the square patch part of a [1, P + S*S, D] table to grid x grid
    (docs/numerics.md#position-table-resampling): the prefix rows (cls) are kept, the patch
    rows resized row-major with antialiased bicubic in float32. An unchanged grid returns the
    input itself."""
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


class VisionTransformer(nn.Module):
    """Backbone without a classifier head. ``grid`` is the size of the stored position grid.

    State-dict order follows timm/DINOv2: cls_token, pos_embed, register_tokens, mask_token,
    patch_embed, norm_pre, blocks, norm.
    """

    def __init__(
        self,
        embed_dim: int,
        depth: int,
        num_heads: int,
        patch_size: int,
        grid: int,
        ffn: str = "mlp",
        activation: str = "gelu",
        norm_eps: float = 1e-6,
        layer_scale: bool = False,
        cls_token: bool = True,
        num_register_tokens: int = 0,
        mask_token: bool = False,
        patch_bias: bool = True,
        pre_norm: bool = False,
        target_final_norm: bool = True,
        attention: str = "sdpa",
    ):
        super().__init__()
        self.embed_dim = embed_dim
        self.patch_size = patch_size
        self.num_register_tokens = num_register_tokens
        self.has_cls_token = cls_token
        self.target_final_norm = target_final_norm
        if cls_token:
            self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, int(cls_token) + grid * grid, embed_dim))
        if num_register_tokens:
            self.register_tokens = nn.Parameter(torch.zeros(1, num_register_tokens, embed_dim))
        if mask_token:
            self.mask_token = nn.Parameter(torch.zeros(1, embed_dim))  # in DINOv2 checkpoints, unused here
        self.patch_embed = PatchEmbed(patch_size, embed_dim, bias=patch_bias)
        self.norm_pre = nn.LayerNorm(embed_dim, eps=norm_eps) if pre_norm else nn.Identity()
        self.blocks = nn.ModuleList([
            Block(embed_dim, num_heads, ffn, activation, norm_eps, layer_scale, attention) for _ in range(depth)
        ])
        self.norm = nn.LayerNorm(embed_dim, eps=norm_eps)
        self.head = nn.Identity()

    @property
    def num_prefix_tokens(self) -> int:
        """Tokens before the patches: cls, then registers."""
        return int(self.has_cls_token) + self.num_register_tokens

    def position_embedding(self, grid_h: int, grid_w: int) -> torch.Tensor:
        stored = math.isqrt(self.pos_embed.shape[1] - int(self.has_cls_token))
        if grid_h != stored or grid_w != stored:
            raise ValueError(f"input gives a {grid_h}x{grid_w} patch grid but the position table is "
                             f"{stored}x{stored}; preprocess the images for this encoder first")
        return self.pos_embed

    def forward_tokens(self, x: torch.Tensor) -> torch.Tensor:
        """All tokens after the last block, before the final norm: [B, prefix + patches, D]."""
        batch, _, height, width = x.shape
        tokens = self.patch_embed(x)
        if self.has_cls_token:
            tokens = torch.cat([self.cls_token.expand(batch, -1, -1), tokens], dim=1)
        tokens = tokens + self.position_embedding(height // self.patch_size, width // self.patch_size)
        if self.num_register_tokens:
            # Registers go right after cls and get no position embedding.
            tokens = torch.cat([tokens[:, :1], self.register_tokens.expand(batch, -1, -1), tokens[:, 1:]], dim=1)
        tokens = self.norm_pre(tokens)
        for block in self.blocks:
            tokens = block(tokens)
        return tokens

    def forward_features(self, x: torch.Tensor) -> Dict[str, torch.Tensor]:
        tokens = self.forward_tokens(x)
        normed = self.norm(tokens)
        first_patch = self.num_prefix_tokens
        features = {
            "x_norm_regtokens": normed[:, int(self.has_cls_token):first_patch],
            "x_norm_patchtokens": normed[:, first_patch:],
            "x_prenorm": tokens,
        }
        if self.has_cls_token:
            features["x_norm_clstoken"] = normed[:, 0]
        return features

    def repa_target(self, x: torch.Tensor) -> torch.Tensor:
        """The patch tokens REPA aligns to, [B, grid*grid, D]: with the final norm for
        DINOv2, MoCo v3 and I-JEPA, without it for MAE and CLIP (docs/numerics.md#encoder-targets)."""
        tokens = self.forward_tokens(x)
        if self.target_final_norm:
            tokens = self.norm(tokens)
        return tokens[:, self.num_prefix_tokens:]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.repa_target(x)


class DinoVisionTransformer(VisionTransformer):
    """DINOv2 backbone (no head), key-compatible with the hub checkpoints.

    ``grid`` is the size of the stored position grid (37 for the hub's 518 px training
    size, 16 after REPA-E's resampling for 256 px). Inputs with another grid use DINOv2's
    own run-time interpolation of the table.
    """

    def __init__(self, embed_dim: int = 768, depth: int = 12, num_heads: int = 12, ffn: str = "mlp",
                 patch_size: int = 14, num_register_tokens: int = 0, grid: int = 37, attention: str = "sdpa"):
        super().__init__(embed_dim, depth, num_heads, patch_size, grid, ffn=ffn, layer_scale=True,
                         num_register_tokens=num_register_tokens, mask_token=True, attention=attention)
        self.interpolate_antialias = num_register_tokens > 0
        self.interpolate_offset = 0.0 if num_register_tokens > 0 else 0.1

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

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.forward_features(x)["x_norm_clstoken"])
