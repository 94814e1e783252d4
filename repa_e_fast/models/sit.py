"""SiT (Scalable Interpolant Transformer) as REPA-E uses it (docs/models.md#sit), key-compatible with
the official checkpoints (manifests ``sit_*.json``).

The module's ``forward`` is the official combined pass: latent BatchNorm -> interpolant ->
transformer -> REPA projector(s) after block ``encoder_depth`` -> denoising and projection
losses. ``inference`` is the bare velocity network used by the samplers.
"""

import math
from typing import Dict, List, Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from .. import ops
from ..losses.interpolants import check_path_type, interpolate, sample_time
from ..losses.repa import denoising_loss
from .attention import Attention
from .fast_path import FastPath, set_fast_path

# name -> (depth, hidden size, heads); every patch size 1/2/4/8 is available.
SIT_CONFIGS = {
    "S": (12, 384, 6),
    "B": (12, 768, 12),
    "L": (24, 1024, 16),
    "XL": (28, 1152, 16),
}
PATCH_SIZES = (1, 2, 4, 8)


def sincos_pos_embed_2d(dim: int, grid_size: int) -> torch.Tensor:
    """Fixed 2-D sin-cos table [grid*grid, dim] in float64
    (docs/numerics.md#positional-and-timestep-embeddings).

    Token k = row * grid + col. The first dim/2 channels encode the COLUMN, the last dim/2
    the ROW; each half is [sin(pos*w) ..., cos(pos*w) ...] with w_m = 10000^(-m/(dim/4)).
    """
    if dim % 4:
        raise ValueError(f"sin-cos position embedding needs a width divisible by 4, got {dim}")
    quarter = dim // 4
    omega = 1.0 / 10000 ** (torch.arange(quarter, dtype=torch.float64) / quarter)
    coords = torch.arange(grid_size, dtype=torch.float64)
    rows, cols = torch.meshgrid(coords, coords, indexing="ij")

    def encode(pos):
        angles = pos.reshape(-1, 1) * omega
        return torch.cat([angles.sin(), angles.cos()], dim=1)

    return torch.cat([encode(cols), encode(rows)], dim=1)


def timestep_frequency_embedding(t: torch.Tensor, dim: int = 256, max_period: float = 10000.0) -> torch.Tensor:
    """[cos(t f_k), sin(t f_k)] with f_k = exp(-ln(max_period) k / (dim/2)); raw t, cos first
    (docs/numerics.md#positional-and-timestep-embeddings)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t[:, None].float() * freqs[None]
    embedding = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        embedding = torch.cat([embedding, torch.zeros_like(embedding[:, :1])], dim=-1)
    return embedding


class TimestepEmbedder(nn.Module):
    def __init__(self, hidden_size: int, frequency_embedding_size: int = 256):
        super().__init__()
        self.frequency_embedding_size = frequency_embedding_size
        self.mlp = nn.Sequential(
            nn.Linear(frequency_embedding_size, hidden_size),
            nn.SiLU(),
            nn.Linear(hidden_size, hidden_size),
        )

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return self.mlp(timestep_frequency_embedding(t, self.frequency_embedding_size).to(t.dtype))


class LabelEmbedder(nn.Module):
    """Class embedding with an extra "null" row (index num_classes) for label dropout / CFG."""

    def __init__(self, num_classes: int, hidden_size: int, dropout_prob: float):
        super().__init__()
        self.num_classes = num_classes
        self.dropout_prob = dropout_prob
        self.embedding_table = nn.Embedding(num_classes + int(dropout_prob > 0), hidden_size)

    def drop_labels(self, labels: torch.Tensor) -> torch.Tensor:
        drop = torch.rand(labels.shape[0], device=labels.device) < self.dropout_prob
        return torch.where(drop, torch.full_like(labels, self.num_classes), labels)

    def forward(self, labels: torch.Tensor) -> torch.Tensor:
        # Dropout depends on the module mode, also in `inference`
        # (docs/numerics.md#label-dropout-and-the-null-label).
        if self.training and self.dropout_prob > 0:
            labels = self.drop_labels(labels)
        return self.embedding_table(labels)


class PatchEmbed(nn.Module):
    def __init__(self, input_size: int, patch_size: int, in_channels: int, hidden_size: int):
        super().__init__()
        if input_size % patch_size:
            raise ValueError(f"latent size {input_size} is not divisible by patch size {patch_size}")
        self.input_size = input_size
        self.grid_size = input_size // patch_size
        self.num_patches = self.grid_size**2
        self.proj = nn.Conv2d(in_channels, hidden_size, kernel_size=patch_size, stride=patch_size, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-2:] != (self.input_size, self.input_size):
            raise ValueError(f"SiT expects {self.input_size}x{self.input_size} latents, got {tuple(x.shape[-2:])}")
        return self.proj(x).flatten(2).transpose(1, 2)


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU(approximate="tanh")
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


class SiTBlock(FastPath, nn.Module):
    """adaLN-Zero block: x += gate * f(LN(x) * (1 + scale) + shift) for attention and MLP."""

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float, qk_norm: bool):
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(hidden_size, num_heads, qkv_bias=True, qk_norm=qk_norm)
        self.norm2 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(hidden_size, int(hidden_size * mlp_ratio))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 6 * hidden_size, bias=True))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(6, dim=-1)
        if self.fused_ops:
            # Triton: LN+modulate in one pass; the attention residual and the MLP's
            # LN+modulate share one read of the residual stream.
            attn_out = self.attn(ops.adaln_modulate(x, shift_msa, scale_msa, eps=self.norm1.eps))
            x, h = ops.gated_residual_adaln_modulate(x, gate_msa, attn_out, shift_mlp, scale_mlp, eps=self.norm2.eps)
            return ops.gated_residual(x, gate_mlp, self.mlp(h))
        x = x + gate_msa.unsqueeze(1) * self.attn(modulate(self.norm1(x), shift_msa, scale_msa))
        x = x + gate_mlp.unsqueeze(1) * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))
        return x


class FinalLayer(FastPath, nn.Module):
    def __init__(self, hidden_size: int, patch_size: int, out_channels: int):
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels, bias=True)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size, bias=True))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        # shift first (docs/numerics.md#sit-blocks-and-final-layer)
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=-1)
        if self.fused_ops:
            return self.linear(ops.adaln_modulate(x, shift, scale, eps=self.norm_final.eps))
        return self.linear(modulate(self.norm_final(x), shift, scale))


def build_projector(hidden_size: int, projector_dim: int, z_dim: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Linear(hidden_size, projector_dim),
        nn.SiLU(),
        nn.Linear(projector_dim, projector_dim),
        nn.SiLU(),
        nn.Linear(projector_dim, z_dim),
    )


class SiT(FastPath, nn.Module):
    """SiT with REPA projectors and the affine-free latent BatchNorm of REPA-E.

    Constructor arguments mirror the official ``models.sit.SiT``. ``fused_attn=False`` (the
    official ``--no-fused-attn``) computes attention with the explicit softmax formula
    (``attention="math"``) instead of a fused kernel; it cannot be combined with a fused
    package kernel (flash_attn, xformers). ``fused_ops`` and ``attention`` are the
    fast-path switches (``fast_path.set_fast_path``), which can be changed later.
    ``decoder_hidden_size`` must equal ``hidden_size`` (the official default of 768 is what
    breaks the official S configs); leaving it None uses ``hidden_size``.
    """

    def __init__(
        self,
        input_size: int = 32,
        patch_size: int = 2,
        in_channels: int = 4,
        hidden_size: int = 1152,
        decoder_hidden_size: Optional[int] = None,
        depth: int = 28,
        num_heads: int = 16,
        mlp_ratio: float = 4.0,
        class_dropout_prob: float = 0.1,
        num_classes: int = 1000,
        z_dims: Sequence[int] = (768,),
        projector_dim: int = 2048,
        encoder_depth: int = 8,
        bn_momentum: Optional[float] = 0.1,
        qk_norm: bool = False,
        fused_attn: bool = True,
        attention: str = "sdpa",
        fused_ops: bool = False,
    ):
        super().__init__()
        if decoder_hidden_size is not None and decoder_hidden_size != hidden_size:
            raise ValueError(
                f"decoder_hidden_size ({decoder_hidden_size}) must equal hidden_size ({hidden_size}); "
                "the official SiT-S factories pass 768 for a 384-wide model, which cannot run"
            )
        if not 1 <= encoder_depth <= depth:
            raise ValueError(f"encoder_depth must be in [1, depth={depth}], got {encoder_depth}")
        if patch_size not in PATCH_SIZES:
            raise ValueError(f"patch_size must be one of {PATCH_SIZES}, got {patch_size}")
        if not z_dims:
            raise ValueError("z_dims must list at least one encoder feature width")
        if not fused_attn:
            if attention not in ("sdpa", "math"):
                raise ValueError(f"fused_attn=False (the explicit attention formula) conflicts with "
                                 f"attention={attention!r}, a fused kernel")
            attention = "math"
        self.in_channels = in_channels
        self.out_channels = in_channels
        self.patch_size = patch_size
        self.num_heads = num_heads
        self.num_classes = num_classes
        self.encoder_depth = encoder_depth
        self.z_dims = list(z_dims)

        self.x_embedder = PatchEmbed(input_size, patch_size, in_channels, hidden_size)
        self.t_embedder = TimestepEmbedder(hidden_size)
        self.y_embedder = LabelEmbedder(num_classes, hidden_size, class_dropout_prob)
        num_patches = self.x_embedder.num_patches
        # Created frozen (as the official model); REPA-E training unfreezes it
        # (docs/numerics.md#pos_embed-is-trained).
        self.pos_embed = nn.Parameter(torch.zeros(1, num_patches, hidden_size), requires_grad=False)
        self.blocks = nn.ModuleList(
            [SiTBlock(hidden_size, num_heads, mlp_ratio, qk_norm) for _ in range(depth)]
        )
        self.projectors = nn.ModuleList([build_projector(hidden_size, projector_dim, z) for z in self.z_dims])
        self.final_layer = FinalLayer(hidden_size, patch_size, self.out_channels)
        self.bn = nn.BatchNorm2d(in_channels, eps=1e-4, momentum=bn_momentum, affine=False, track_running_stats=True)
        self.initialize_weights()
        # Fast path: the fused adaLN modulation, gated residual and REPA cosine loss.
        set_fast_path(self, fused_ops=fused_ops, attention=attention)

    # ----------------------------------------------------------------------------------
    # Initialisation and latent statistics
    # ----------------------------------------------------------------------------------
    @torch.no_grad()
    def initialize_weights(self) -> None:
        """Official initialisation (docs/models.md#sit): the model starts as the identity, output 0."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)
        grid = self.x_embedder.grid_size
        self.pos_embed.copy_(sincos_pos_embed_2d(self.pos_embed.shape[-1], grid).float().unsqueeze(0))
        weight = self.x_embedder.proj.weight
        nn.init.xavier_uniform_(weight.view(weight.shape[0], -1))
        nn.init.zeros_(self.x_embedder.proj.bias)
        nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        for block in self.blocks:
            nn.init.zeros_(block.adaLN_modulation[-1].weight)
            nn.init.zeros_(block.adaLN_modulation[-1].bias)
        for layer in (self.final_layer.adaLN_modulation[-1], self.final_layer.linear):
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)
        self.bn.reset_running_stats()

    @torch.no_grad()
    def init_bn(self, latents_scale: torch.Tensor, latents_bias: torch.Tensor) -> None:
        """running_mean = bias, running_var = (1/scale)^2; tensors of [C] or [1,C,1,1]
        (docs/numerics.md#latent-batchnorm)."""
        scale = torch.as_tensor(latents_scale).reshape(-1).float()
        bias = torch.as_tensor(latents_bias).reshape(-1).float()
        if scale.numel() != self.in_channels or bias.numel() != self.in_channels:
            raise ValueError(
                f"latent statistics have {scale.numel()}/{bias.numel()} channels, the SiT expects {self.in_channels}"
            )
        self.bn.running_mean.copy_(bias)
        self.bn.running_var.copy_(scale.reciprocal().square())

    @torch.no_grad()
    def extract_latents_stats(self) -> Dict[str, torch.Tensor]:
        """latents_scale = 1/sqrt(running_var) (no eps), latents_bias = running_mean, [1,C,1,1]."""
        shape = (1, self.in_channels, 1, 1)
        return {
            "latents_scale": self.bn.running_var.rsqrt().reshape(shape).clone(),
            "latents_bias": self.bn.running_mean.reshape(shape).clone(),
        }

    # ----------------------------------------------------------------------------------
    # Network
    # ----------------------------------------------------------------------------------
    def unpatchify(self, x: torch.Tensor) -> torch.Tensor:
        """[N, T, p*p*C] -> [N, C, H, W]; each token's vector is (p_row, p_col, channel)
        (docs/numerics.md#sit-blocks-and-final-layer)."""
        p, c = self.patch_size, self.out_channels
        grid = self.x_embedder.grid_size
        x = x.reshape(x.shape[0], grid, grid, p, p, c)
        return torch.einsum("nhwpqc->nchpwq", x).reshape(x.shape[0], c, grid * p, grid * p)

    def conditioning(self, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.t_embedder(t) + self.y_embedder(y)

    def _run(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor, align_only: bool, final_layer: bool):
        """Transformer on (already interpolated) latents. Returns (output or None, zs_tilde)."""
        h = self.x_embedder(x) + self.pos_embed
        batch, tokens, width = h.shape
        c = self.conditioning(t, y)
        zs_tilde: List[torch.Tensor] = []
        for index, block in enumerate(self.blocks):
            h = block(h, c)
            if index + 1 == self.encoder_depth:
                zs_tilde = [projector(h.reshape(-1, width)).reshape(batch, tokens, -1) for projector in self.projectors]
                if align_only:
                    break
        if not final_layer:
            return None, zs_tilde
        return self.unpatchify(self.final_layer(h, c)), zs_tilde

    def forward(
        self,
        x: torch.Tensor,
        y: torch.Tensor,
        zs: Sequence[torch.Tensor],
        path_type: str = "linear",
        weighting: str = "uniform",
        align_only: bool = False,
        time_input: Optional[torch.Tensor] = None,
        noises: Optional[torch.Tensor] = None,
        align_only_final_layer: bool = True,
    ) -> Dict[str, object]:
        """The official training pass on RAW latents ``x`` [N,C,H,W].

        Draw order when sampling (docs/numerics.md#random-draws-and-their-order): time (CPU
        generator), noise (randn_like), label drop.
        ``align_only`` stops after block ``encoder_depth``; the official code still applies
        the final layer to that state (set ``align_only_final_layer=False`` to skip it: no
        loss or gradient depends on it).
        Returns a dict with ``denoising_loss`` [N] (None when align_only), ``proj_loss``
        (0-dim), ``zs_tilde``, ``model_output``, ``time_input``, ``noises``.
        """
        check_path_type(path_type)
        if len(zs) != len(self.projectors):
            raise ValueError(f"got {len(zs)} encoder targets, the SiT has {len(self.projectors)} projectors")
        x = self.bn(x)
        if time_input is None:
            time_input = sample_time(x.shape[0], weighting, path_type)
        time_input = time_input.to(device=x.device, dtype=x.dtype)
        if noises is None:
            noises = torch.randn_like(x)
        noises = noises.to(device=x.device, dtype=x.dtype)
        model_input, model_target = interpolate(x, noises, time_input, path_type)
        output, zs_tilde = self._run(
            model_input, time_input.flatten(), y, align_only, final_layer=(not align_only) or align_only_final_layer
        )
        return {
            "denoising_loss": None if align_only else denoising_loss(output, model_target),
            "proj_loss": self.projection_loss(zs, zs_tilde),
            "zs_tilde": zs_tilde,
            "model_output": output,
            "time_input": time_input,
            "noises": noises,
        }

    def projection_loss(self, zs: Sequence[torch.Tensor], zs_tilde: Sequence[torch.Tensor]) -> torch.Tensor:
        """The REPA loss (``repa_e_fast.ops.repa_cosine_loss``; its reference off the fast path)."""
        repa_loss = ops.repa_cosine_loss if self.fused_ops else ops.repa_cosine_loss_reference
        return repa_loss(list(zs), list(zs_tilde))

    def inference(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Velocity for NORMALISED latents ``x`` at times ``t`` [N]; no BN, no loss.
        Label dropout follows the module mode: call it in eval mode
        (docs/numerics.md#label-dropout-and-the-null-label)."""
        output, _ = self._run(x, t, y, align_only=False, final_layer=True)
        return output


def sit_config(name: str) -> Dict[str, int]:
    """'SiT-XL/2' -> constructor kwargs (depth, hidden_size, num_heads, patch_size)."""
    try:
        size, patch = name.removeprefix("SiT-").split("/")
        depth, hidden, heads = SIT_CONFIGS[size]
        patch_size = int(patch)
    except (ValueError, KeyError):
        names = ", ".join(f"SiT-{s}/{p}" for s in SIT_CONFIGS for p in PATCH_SIZES)
        raise ValueError(f"unknown SiT model {name!r}; choose one of {names}") from None
    if patch_size not in PATCH_SIZES:
        raise ValueError(f"unknown SiT patch size in {name!r}; choose one of {PATCH_SIZES}")
    return {"depth": depth, "hidden_size": hidden, "num_heads": heads, "patch_size": patch_size}


def build_sit(name: str, **kwargs) -> SiT:
    """Build a named configuration, e.g. ``build_sit("SiT-XL/2", input_size=32, in_channels=4)``."""
    config = sit_config(name)
    config.update(kwargs)
    return SiT(**config)


SIT_MODEL_NAMES = [f"SiT-{s}/{p}" for s in SIT_CONFIGS for p in PATCH_SIZES]
