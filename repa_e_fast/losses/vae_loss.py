"""VAE regularisation loss of REPA-E (``l1_lpips_kl_gan``; docs/step.md#the-vae-loss-module).

``VAERegularizationLoss`` is key-compatible with the official ``ReconstructionLoss_Single_Stage``
(manifests ``vae_loss_l1_lpips_kl_gan[_lecam].json``): ``logvar``, the LeCam EMA buffers
(only when LeCam is on), ``discriminator.*`` and ``perceptual_loss.{imagenet_mean,
imagenet_std,lpips.*}``. Its parameter order is the official one (``logvar`` first), so an
optimizer over ``parameters()`` has the official ``opt_disc`` layout.

Official behaviours kept on purpose (docs/numerics.md#vae-loss):
- the module is never put in eval mode: the discriminator's BatchNorms always use batch
  statistics and update their running stats on each of its forwards;
- LPIPS receives [-1, 1] images although it is written for [0, 1];
- the GAN weight is fixed (no adaptive weight), the L1 term is divided by exp(logvar) with
  a frozen logvar.
"""

from dataclasses import dataclass, fields
from typing import Dict, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.func import functional_call

from ..models.discriminator import NLayerDiscriminator
from ..models.fast_path import FastPath
from ..models.lpips import LPIPS
from ..models.vae import DiagonalGaussianDistribution


@dataclass
class VAELossConfig:
    """The ``losses`` block of the official YAML (defaults = ``configs/l1_lpips_kl_gan.yaml``)."""

    discriminator_start: int = 0
    discriminator_factor: float = 1.0
    discriminator_weight: float = 0.1
    quantizer_weight: float = 1.0
    perceptual_loss: str = "lpips"
    perceptual_weight: float = 1.0
    reconstruction_loss: str = "l1"
    reconstruction_weight: float = 1.0
    lecam_regularization_weight: float = 0.0
    kl_weight: float = 1e-6
    logvar_init: float = 0.0
    lecam_ema_decay: float = 0.999

    @classmethod
    def from_official(cls, config: dict) -> "VAELossConfig":
        """Accepts the official nested config (``{"model": ..., "losses": {...}}``) or a flat dict."""
        losses = config.get("losses", config)
        quantize_mode = config.get("model", {}).get("vq_model", {}).get("quantize_mode", "vae")
        if quantize_mode != "vae":
            raise ValueError(f"only quantize_mode 'vae' (KL autoencoder) is supported, got {quantize_mode!r}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(losses) - known)
        if unknown:
            raise ValueError(f"unknown VAE loss options {unknown}; known: {sorted(known)}")
        result = cls(**losses)
        if result.perceptual_loss != "lpips":
            raise ValueError(f"perceptual_loss must be 'lpips', got {result.perceptual_loss!r}")
        if result.reconstruction_loss not in ("l1", "l2"):
            raise ValueError(f"reconstruction_loss must be 'l1' or 'l2', got {result.reconstruction_loss!r}")
        return result


class PerceptualLoss(nn.Module):
    """Holder with the official key layout; ``imagenet_mean/std`` are stored but unused by LPIPS."""

    def __init__(self):
        super().__init__()
        self.register_buffer("imagenet_mean", torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1))
        self.register_buffer("imagenet_std", torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1))
        self.lpips = LPIPS()

    def forward(self, input: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        self.lpips.eval()  # dropout must stay off whatever mode the parent is in
        return self.lpips(input, target)


def hinge_discriminator_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    return 0.5 * (torch.mean(F.relu(1.0 - logits_real)) + torch.mean(F.relu(1.0 + logits_fake)))


class VAERegularizationLoss(FastPath, nn.Module):
    """``fused_ops`` (``fast_path.set_fast_path``): the fast LPIPS (one 2B VGG batch,
    in-place ReLUs, one function per tap); the discriminator and the other terms have no
    fast path."""

    def __init__(self, config: VAELossConfig = VAELossConfig()):
        super().__init__()
        self.config = config
        # Not trainable in REPA-E (created with requires_grad=False).
        self.logvar = nn.Parameter(torch.tensor(float(config.logvar_init)), requires_grad=False)
        if config.lecam_regularization_weight > 0:
            self.register_buffer("ema_real_logits_mean", torch.zeros(1))
            self.register_buffer("ema_fake_logits_mean", torch.zeros(1))
        self.discriminator = NLayerDiscriminator(input_nc=3, ndf=64, n_layers=3)
        self.perceptual_loss = PerceptualLoss()

    def discriminator_factor(self, global_step: int) -> float:
        return self.config.discriminator_factor if global_step >= self.config.discriminator_start else 0.0

    def forward(
        self,
        inputs: torch.Tensor,
        reconstructions: torch.Tensor,
        posterior: DiagonalGaussianDistribution,
        global_step: int,
        mode: str = "generator",
    ) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
        """``inputs``/``reconstructions`` in [-1, 1]; returns (loss, detached loss dict)."""
        # The official module runs in fp32 with autocast disabled.
        with torch.autocast(device_type=inputs.device.type, enabled=False):
            inputs, reconstructions = inputs.float(), reconstructions.float()
            if mode == "generator":
                return self._generator_loss(inputs, reconstructions, posterior, global_step)
            if mode == "discriminator":
                return self._discriminator_loss(inputs, reconstructions, global_step)
        raise ValueError(f"mode must be 'generator' or 'discriminator', got {mode!r}")

    def _frozen_discriminator(self, x: torch.Tensor) -> torch.Tensor:
        """D(x) with gradients flowing to x but not to D's parameters, without toggling
        requires_grad (that breaks ZeRO-2's gradient hooks). Its BatchNorms still use batch
        statistics and update their running stats in place, as the official train-mode call."""
        params = {name: p.detach() for name, p in self.discriminator.named_parameters()}
        buffers = dict(self.discriminator.named_buffers())
        return functional_call(self.discriminator, {**params, **buffers}, (x,))

    def _generator_loss(self, inputs, reconstructions, posterior, global_step):
        config = self.config
        if config.reconstruction_loss == "l1":
            reconstruction = F.l1_loss(inputs, reconstructions, reduction="mean")
        else:
            reconstruction = F.mse_loss(inputs, reconstructions, reduction="mean")
        reconstruction = reconstruction * config.reconstruction_weight / torch.exp(self.logvar)
        perceptual = self.perceptual_loss(inputs, reconstructions).mean() * config.perceptual_weight
        kl = posterior.kl()
        kl = torch.sum(kl) / kl.shape[0]
        factor = self.discriminator_factor(global_step)
        gan = torch.zeros((), device=inputs.device)
        if factor > 0.0 and config.discriminator_weight > 0.0:
            gan = -torch.mean(self._frozen_discriminator(reconstructions))
        d_weight = config.discriminator_weight
        weighted_gan = d_weight * factor * gan
        total = reconstruction + perceptual + config.kl_weight * kl + weighted_gan
        scalar = lambda v: torch.tensor(v, dtype=torch.float32, device=inputs.device)  # noqa: E731
        return total, {
            "total_loss": total.detach(),
            "reconstruction_loss": reconstruction.detach(),
            "perceptual_loss": perceptual.detach(),
            "kl_loss": (config.kl_weight * kl).detach(),
            "weighted_gan_loss": weighted_gan.detach(),
            "discriminator_factor": scalar(factor),
            "d_weight": scalar(d_weight),
            "gan_loss": gan.detach(),
        }

    def _discriminator_loss(self, inputs, reconstructions, global_step):
        factor = self.discriminator_factor(global_step)
        # Two separate forwards: real and fake batches get their own BN statistics
        # (docs/numerics.md#the-discriminator-stays-in-train-mode).
        logits_real = self.discriminator(inputs.detach())
        logits_fake = self.discriminator(reconstructions.detach())
        loss = factor * hinge_discriminator_loss(logits_real, logits_fake)
        weight = self.config.lecam_regularization_weight
        lecam = torch.zeros((), device=inputs.device)
        if weight > 0:
            real_mean, fake_mean = logits_real.mean(), logits_fake.mean()
            # Uses the EMAs from BEFORE this call's update (docs/numerics.md#discriminator-loss-and-lecam).
            lecam = (F.relu(real_mean - self.ema_fake_logits_mean).pow(2).mean()
                     + F.relu(self.ema_real_logits_mean - fake_mean).pow(2).mean()) * weight
            loss = loss + lecam
            decay = self.config.lecam_ema_decay
            with torch.no_grad():
                self.ema_real_logits_mean.mul_(decay).add_(real_mean.detach() * (1 - decay))
                self.ema_fake_logits_mean.mul_(decay).add_(fake_mean.detach() * (1 - decay))
        return loss, {
            "discriminator_loss": loss.detach(),
            "logits_real": logits_real.detach().mean(),
            "logits_fake": logits_fake.detach().mean(),
            "lecam_loss": lecam.detach(),
        }
