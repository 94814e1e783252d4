"""AutoencoderKL (LDM / SD-VAE layout) as REPA-E uses it (docs/models.md#vae), key-compatible with the
official checkpoints (manifests ``vae_f8d4.json``, ``vae_f16d32.json``).

Layouts: ``f8d4`` (SD-VAE: 4 latent channels, 8x downsampling) and ``f16d32`` (IN-VAE /
VA-VAE: 32 channels, 16x). ``ch`` (base width) is 128 in the published models; the
fixtures use 32.
"""

from dataclasses import dataclass
from typing import Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from .. import ops
from .fast_path import FastPath, set_fast_path

VAE_LAYOUTS = {
    "f8d4": {"embed_dim": 4, "ch_mult": (1, 2, 4, 4)},
    "f16d32": {"embed_dim": 32, "ch_mult": (1, 1, 2, 2, 4)},
}


def Normalize(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(num_groups=32, num_channels=channels, eps=1e-6, affine=True)


def norm_swish(norm: nn.GroupNorm, x: torch.Tensor, fused: bool) -> torch.Tensor:
    """GroupNorm then swish; the one place where the fused kernel is switched in."""
    if fused:
        return ops.group_norm(x, norm.num_groups, norm.weight, norm.bias, eps=norm.eps, activation="silu")
    return F.silu(norm(x))


class ResnetBlock(FastPath, nn.Module):
    def __init__(self, in_channels: int, out_channels: int, dropout: float = 0.0):
        super().__init__()
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.norm1 = Normalize(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, kernel_size=3, stride=1, padding=1)
        self.norm2 = Normalize(out_channels)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, kernel_size=3, stride=1, padding=1)
        if in_channels != out_channels:
            self.nin_shortcut = nn.Conv2d(in_channels, out_channels, kernel_size=1, stride=1, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(norm_swish(self.norm1, x, self.fused_ops))
        h = self.conv2(self.dropout(norm_swish(self.norm2, h, self.fused_ops)))
        if self.in_channels != self.out_channels:
            x = self.nin_shortcut(x)
        return x + h


class AttnBlock(FastPath, nn.Module):
    """Single-head self-attention over all H*W positions, 1x1-conv projections
    (docs/numerics.md#vae-blocks-and-posterior)."""

    def __init__(self, channels: int):
        super().__init__()
        self.norm = Normalize(channels)
        self.q = nn.Conv2d(channels, channels, kernel_size=1)
        self.k = nn.Conv2d(channels, channels, kernel_size=1)
        self.v = nn.Conv2d(channels, channels, kernel_size=1)
        self.proj_out = nn.Conv2d(channels, channels, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fused_ops:
            h = ops.group_norm(x, self.norm.num_groups, self.norm.weight, self.norm.bias, eps=self.norm.eps)
        else:
            h = self.norm(x)
        batch, channels, height, width = x.shape
        # [B, 1 head, HW, C]; SDPA's default scale C^-0.5 is the official one.
        q, k, v = (conv(h).flatten(2).transpose(1, 2).unsqueeze(1) for conv in (self.q, self.k, self.v))
        out = F.scaled_dot_product_attention(q, k, v)
        out = out.squeeze(1).transpose(1, 2).reshape(batch, channels, height, width)
        return x + self.proj_out(out)


class Downsample(nn.Module):
    """Pad right/bottom by one pixel, then a stride-2 3x3 conv without padding
    (docs/numerics.md#vae-blocks-and-posterior)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, kernel_size=3, stride=2, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1), mode="constant", value=0))


# Sub-pixel form of nearest-2x-upsample + 3x3 conv: output row 2i+a reads the upsampled
# rows 2i+a-1..2i+a+1, i.e. source rows {i-1, i} (a = 0) or {i, i+1} (a = 1), with the
# kernel rows summed accordingly. PHASE_ROWS[a] maps the 3 kernel rows to those 2 rows.
PHASE_ROWS = ((1.0, 0.0, 0.0, 0.0, 1.0, 1.0), (1.0, 1.0, 0.0, 0.0, 0.0, 1.0))


def subpixel_upsample_conv(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    """``conv3x3(nearest_upsample_2x(x), weight, bias, padding=1)`` computed as one 2x2
    conv with 4x the output channels (one block per output phase) on the source grid:
    16 instead of 36 multiply-adds per source pixel and output channel (4/9 of the
    FLOPs), equal up to fp32 rounding (the summed kernel taps add in another order)."""
    out_ch, _, _, _ = weight.shape
    rows = torch.tensor(PHASE_ROWS, dtype=weight.dtype, device=weight.device).view(2, 2, 3)
    # phase kernels [a, b, out, in, 2, 2] = rows[a] @ w @ rows[b]^T
    phases = torch.einsum("apk,oikl,bql->aboipq", rows, weight, rows)
    y = F.conv2d(F.pad(x, (1, 1, 1, 1)), phases.reshape(4 * out_ch, -1, 2, 2),
                 None if bias is None else bias.repeat(4))
    n, _, h, w = x.shape
    # phase (a, b) of output pixel (i, j) is y[a*2+b block] at (i + a, j + b)
    y = y.view(n, 2, 2, out_ch, h + 1, w + 1)
    blocks = [[y[:, a, b, :, a:a + h, b:b + w] for b in (0, 1)] for a in (0, 1)]
    rows_ab = [torch.stack(pair, dim=-1) for pair in blocks]           # [n, o, h, w, 2(b)]
    out = torch.stack(rows_ab, dim=3)                                   # [n, o, h, 2(a), w, 2(b)]
    return out.reshape(n, out_ch, 2 * h, 2 * w).contiguous(memory_format=_memory_format(x))


def _memory_format(x: torch.Tensor) -> torch.memory_format:
    return torch.channels_last if x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last) \
        and not x.is_contiguous() else torch.contiguous_format


class Upsample(nn.Module):
    # Opt-in (lever 8 of issue 15): the sub-pixel form, 4/9 of the FLOPs, equal up to fp32
    # rounding. Off by default: the official op sequence.
    subpixel = False

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, kernel_size=3, stride=1, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.subpixel:
            return subpixel_upsample_conv(x, self.conv.weight, self.conv.bias)
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class Level(nn.Module):
    """One resolution level; holds ``block``, ``attn`` and ``downsample``/``upsample`` keys."""


class Encoder(FastPath, nn.Module):
    def __init__(
        self,
        ch: int = 128,
        ch_mult: Sequence[int] = (1, 2, 4, 4),
        num_res_blocks: int = 2,
        attn_resolutions: Sequence[int] = (16,),
        dropout: float = 0.0,
        in_channels: int = 3,
        resolution: int = 256,
        z_channels: int = 4,
        double_z: bool = True,
    ):
        super().__init__()
        self.conv_in = nn.Conv2d(in_channels, ch, kernel_size=3, stride=1, padding=1)
        in_mult = (1,) + tuple(ch_mult)
        # Attention placement follows the NOMINAL resolution, not the input size
        # (docs/numerics.md#vae-blocks-and-posterior).
        current_res = resolution
        self.down = nn.ModuleList()
        block_in = ch
        for level, mult in enumerate(ch_mult):
            stage = Level()
            stage.block = nn.ModuleList()
            stage.attn = nn.ModuleList()
            block_in = ch * in_mult[level]
            block_out = ch * mult
            for _ in range(num_res_blocks):
                stage.block.append(ResnetBlock(block_in, block_out, dropout))
                block_in = block_out
                if current_res in attn_resolutions:
                    stage.attn.append(AttnBlock(block_in))
            if level != len(ch_mult) - 1:
                stage.downsample = Downsample(block_in)
                current_res //= 2
            self.down.append(stage)
        self.mid = nn.Module()
        self.mid.block_1 = ResnetBlock(block_in, block_in, dropout)
        self.mid.attn_1 = AttnBlock(block_in)
        self.mid.block_2 = ResnetBlock(block_in, block_in, dropout)
        self.norm_out = Normalize(block_in)
        self.conv_out = nn.Conv2d(block_in, 2 * z_channels if double_z else z_channels, 3, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        for stage in self.down:
            for index, block in enumerate(stage.block):
                h = block(h)
                if len(stage.attn) > 0:
                    h = stage.attn[index](h)
            if hasattr(stage, "downsample"):
                h = stage.downsample(h)
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(h)))
        return self.conv_out(norm_swish(self.norm_out, h, self.fused_ops))


class Decoder(FastPath, nn.Module):
    def __init__(
        self,
        ch: int = 128,
        out_ch: int = 3,
        ch_mult: Sequence[int] = (1, 2, 4, 4),
        num_res_blocks: int = 2,
        attn_resolutions: Sequence[int] = (16,),
        dropout: float = 0.0,
        resolution: int = 256,
        z_channels: int = 4,
    ):
        super().__init__()
        num_levels = len(ch_mult)
        block_in = ch * ch_mult[-1]
        current_res = resolution // 2 ** (num_levels - 1)
        self.conv_in = nn.Conv2d(z_channels, block_in, kernel_size=3, stride=1, padding=1)
        self.mid = nn.Module()
        self.mid.block_1 = ResnetBlock(block_in, block_in, dropout)
        self.mid.attn_1 = AttnBlock(block_in)
        self.mid.block_2 = ResnetBlock(block_in, block_in, dropout)
        # Built from the lowest resolution up, stored at index = level (up.0 is full res).
        stages = [None] * num_levels
        for level in reversed(range(num_levels)):
            stage = Level()
            stage.block = nn.ModuleList()
            stage.attn = nn.ModuleList()
            block_out = ch * ch_mult[level]
            for _ in range(num_res_blocks + 1):
                stage.block.append(ResnetBlock(block_in, block_out, dropout))
                block_in = block_out
                if current_res in attn_resolutions:
                    stage.attn.append(AttnBlock(block_in))
            if level != 0:
                stage.upsample = Upsample(block_in)
                current_res *= 2
            stages[level] = stage
        self.up = nn.ModuleList(stages)
        self.norm_out = Normalize(block_in)
        self.conv_out = nn.Conv2d(block_in, out_ch, kernel_size=3, stride=1, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(self.conv_in(z))))
        for level in reversed(range(len(self.up))):
            stage = self.up[level]
            for index, block in enumerate(stage.block):
                h = block(h)
                if len(stage.attn) > 0:
                    h = stage.attn[index](h)
            if hasattr(stage, "upsample"):
                h = stage.upsample(h)
        return self.conv_out(norm_swish(self.norm_out, h, self.fused_ops))


class DiagonalGaussianDistribution:
    """Posterior from moments [N, 2C, h, w]: mean = first C channels, logvar = last C,
    clamped to [-30, 20] (docs/numerics.md#vae-blocks-and-posterior)."""

    def __init__(self, moments: torch.Tensor):
        self.parameters = moments
        self.mean, self.logvar = torch.chunk(moments, 2, dim=1)
        self.logvar = torch.clamp(self.logvar, -30.0, 20.0)
        self.std = torch.exp(0.5 * self.logvar)
        self.var = torch.exp(self.logvar)

    def sample(self, noise: Optional[torch.Tensor] = None) -> torch.Tensor:
        """mean + std * eps, eps drawn as torch.randn(mean.shape) in fp32 on the mean's device
        unless given (so a test or a resumed run can inject it)."""
        if noise is None:
            noise = torch.randn(self.mean.shape, device=self.mean.device, dtype=torch.float32)
        return self.mean + self.std * noise

    def mode(self) -> torch.Tensor:
        return self.mean

    def kl(self) -> torch.Tensor:
        """KL to N(0, I) per sample: 0.5 * sum over (C,H,W) of mean^2 + var - 1 - logvar."""
        return 0.5 * torch.sum(self.mean.pow(2) + self.var - 1.0 - self.logvar, dim=[1, 2, 3])


@dataclass
class DecoderOutput:
    sample: torch.Tensor


class AutoencoderKL(FastPath, nn.Module):
    """``fused_ops``: the fast path (``fast_path.set_fast_path``), the fused Triton
    GroupNorm(+SiLU) op of ``repa_e_fast.ops``; state-dict keys unchanged."""

    def __init__(
        self,
        embed_dim: int = 4,
        ch_mult: Sequence[int] = (1, 2, 4, 4),
        ch: int = 128,
        num_res_blocks: int = 2,
        attn_resolutions: Sequence[int] = (16,),
        resolution: int = 256,
        dropout: float = 0.0,
        in_channels: int = 3,
        out_ch: int = 3,
        use_variational: bool = True,
        fused_ops: bool = False,
    ):
        super().__init__()
        if not use_variational:
            raise ValueError("only the variational (KL) autoencoder is supported (use_variational=True)")
        self.embed_dim = embed_dim
        self.downsample_factor = 2 ** (len(ch_mult) - 1)
        common = dict(ch=ch, ch_mult=ch_mult, num_res_blocks=num_res_blocks, attn_resolutions=attn_resolutions,
                      dropout=dropout, resolution=resolution, z_channels=embed_dim)
        self.encoder = Encoder(in_channels=in_channels, double_z=True, **common)
        self.decoder = Decoder(out_ch=out_ch, **common)
        self.quant_conv = nn.Conv2d(2 * embed_dim, 2 * embed_dim, 1)
        self.post_quant_conv = nn.Conv2d(embed_dim, embed_dim, 1)
        set_fast_path(self, fused_ops=fused_ops)

    def set_subpixel_upsample(self, enabled: bool) -> "AutoencoderKL":
        """The decoder's upsample + 3x3 conv as one sub-pixel conv (``subpixel_upsample_conv``);
        same keys and weights."""
        for module in self.modules():
            if isinstance(module, Upsample):
                module.subpixel = enabled
        return self

    def encode(self, x: torch.Tensor) -> DiagonalGaussianDistribution:
        return DiagonalGaussianDistribution(self.quant_conv(self.encoder(x)))

    def decode(self, z: torch.Tensor) -> DecoderOutput:
        return DecoderOutput(sample=self.decoder(self.post_quant_conv(z)))

    def forward(
        self, x: torch.Tensor, noise: Optional[torch.Tensor] = None, decode: bool = True
    ) -> Tuple[DiagonalGaussianDistribution, torch.Tensor, Optional[torch.Tensor]]:
        """Returns (posterior, sampled z, decode(z).sample or None when ``decode=False``)."""
        posterior = self.encode(x)
        z = posterior.sample(noise)
        return posterior, z, self.decode(z).sample if decode else None


def build_vae(layout: str, ch: int = 128, **kwargs) -> AutoencoderKL:
    """``build_vae("f8d4")`` / ``build_vae("f16d32")``: the official layouts."""
    if layout not in VAE_LAYOUTS:
        raise ValueError(f"unknown VAE layout {layout!r}; choose one of {sorted(VAE_LAYOUTS)}")
    return AutoencoderKL(ch=ch, **VAE_LAYOUTS[layout], **kwargs)


def preprocess_images_for_vae(images: torch.Tensor) -> torch.Tensor:
    """uint8 [N,3,H,W] -> float32 in [-1, 1] (docs/numerics.md#vae-blocks-and-posterior)."""
    if images.dtype != torch.uint8:
        raise TypeError(f"expected uint8 images, got {images.dtype}")
    return images.float() / 127.5 - 1
