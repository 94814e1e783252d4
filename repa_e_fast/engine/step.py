"""The REPA-E training step (spec §2.2) and the LDM-only step (spec §9.1).

One REPA-E iteration, in the official order (reference README R1-R9):

  VAE forward (one posterior sample z, reconstruction)
  (A) VAE:  regularisation loss (L1 + LPIPS + KL + GAN, frozen D)
            + vae_align_proj_coeff * REPA loss of an align-only SiT pass (eval mode,
              frozen SiT, stops after block encoder_depth; its gradient reaches the VAE
              through the latent) -> backward
  (B) discriminator: hinge loss on (real, detached reconstruction) -> backward
  (C) SiT:  denoising + proj_coeff * REPA loss on the detached latent, train mode, the SAME
            t and noise as (A) -> backward
  then, for VAE, discriminator, SiT: clip, AdamW step; EMA update.

The official script steps each optimizer right after its backward. No later sub-step reads
an earlier update, so stepping all three at the end is the same arithmetic, and a
non-finite loss or gradient norm anywhere can skip the whole iteration.

Everything device- or precision-specific goes through the backend (``backends.py``).
"""

from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence

import torch
import torch.nn as nn
from torch.func import functional_call

from ..models.vae import preprocess_images_for_vae
from .ema import update_ema


@dataclass
class StepConfig:
    path_type: str = "linear"
    weighting: str = "uniform"
    proj_coeff: float = 0.5
    vae_align_proj_coeff: float = 1.5
    max_grad_norm: float = 1.0
    ema_decay: float = 0.9999
    # The align pass's final layer feeds no loss (Q27); skipping it changes no number.
    align_pass_final_layer: bool = False


def frozen_call(module: nn.Module, *args, **kwargs):
    """Run ``module`` with DETACHED parameters: gradients flow to the inputs only.

    This replaces the official ``requires_grad(model, False)`` toggling, which breaks
    gradient-hook bookkeeping of DDP / ZeRO-2 (a parameter hook that never fires hangs the
    reduction). Buffers are passed as they are, so a train-mode BatchNorm would still update
    its running statistics in place.
    """
    state = {name: p.detach() for name, p in module.named_parameters()}
    state.update(dict(module.named_buffers()))
    return functional_call(module, state, args, kwargs)


def encoder_targets(encoders: Sequence[nn.Module], images: torch.Tensor) -> List[torch.Tensor]:
    with torch.no_grad():
        return [encoder(images) for encoder in encoders]


class _UpdateMixin:
    """Fault handling and the update of several models at the end of a step.

    A non-finite loss (checked on every rank before its backward) or, outside fp16, a
    non-finite gradient norm makes the step skip the optimizer update of every model and
    the EMA update; ``last_fault`` names what went bad and the trainer counts it. Under fp16
    a non-finite gradient norm is a loss-scale overflow: the scaler skips that optimizer
    only, as in the official run."""

    last_fault: Optional[str] = None
    inject_fault: Optional[str] = None  # tests: the name of a loss to treat as NaN

    def _check_finite(self, name: str, value: torch.Tensor) -> bool:
        if name == self.inject_fault:
            value = value.detach() * float("nan")
        if self.backend.all_finite([value]):
            return True
        self.last_fault = name
        return False

    def _give_up(self, logs, names: Sequence[str]):
        # The gradients every model accumulated in this window are dropped, on every rank
        # (all_finite agreed on the fault), so no backend carries a partial window over.
        for name in names:
            self.backend.skip(name)
        self.backend.end_micro_step()
        return logs

    def _update(self, logs, names: Sequence[str]) -> None:
        backend, config = self.backend, self.config
        norms = {name: backend.clip_grad_norm(name, config.max_grad_norm) for name in names}
        if getattr(backend, "checks_grad_norm", True):
            bad = [f"grad_norm_{name}" for name, norm in norms.items()
                   if norm is not None and not bool(torch.isfinite(norm))]
            if bad:
                self.last_fault = ", ".join(bad)
                for name in names:
                    backend.skip(name)
                logs.update({f"grad_norm_{name}": norm.detach() for name, norm in norms.items() if norm is not None})
                return
        for name in names:
            backend.step(name)
            norm = norms[name] if norms[name] is not None else backend.grad_norm_after_step(name)
            if norm is not None:
                logs[f"grad_norm_{name}"] = norm.detach()
        update_ema(self.ema, backend.unwrap("sit"), config.ema_decay)


class REPAEStep(_UpdateMixin):
    """Callable training step. Models are reached through ``backend.models`` (keys "sit",
    "vae", "disc" where "disc" is the whole VAE-loss module) so that wrapped models (DDP,
    DeepSpeed engines) work unchanged; ``ema`` is a plain SiT copy."""

    def __init__(self, backend, ema: nn.Module, config: StepConfig = StepConfig(),
                 encoders: Sequence[nn.Module] = ()):
        self.backend = backend
        self.ema = ema
        self.config = config
        self.encoders = list(encoders)
        sit = backend.unwrap("sit")
        # REPA-E trains pos_embed from the first step (R7, Q1): it is in the SiT optimizer
        # and unfrozen by the official per-step requires_grad(model, True).
        sit.pos_embed.requires_grad_(True)

    def __call__(
        self,
        images: torch.Tensor,
        labels: torch.Tensor,
        global_step: int,
        zs: Optional[Sequence[torch.Tensor]] = None,
        posterior_noise: Optional[torch.Tensor] = None,
        time_input: Optional[torch.Tensor] = None,
        noises: Optional[torch.Tensor] = None,
        keep_intermediate: bool = False,
    ) -> Dict[str, torch.Tensor]:
        """``images`` uint8 [B,3,H,W], ``labels`` int64 [B]. ``zs`` (encoder targets) are
        computed from the images when not given. ``posterior_noise``, ``time_input`` and
        ``noises`` inject the random draws (otherwise drawn in the official order).
        Returns detached tensors: the 19 logged values of the official trainer (spec §2.7),
        grad norms only on synchronising micro-steps; with ``keep_intermediate`` also the
        intermediate tensors."""
        backend, config = self.backend, self.config
        sit, vae, loss_fn = backend.models["sit"], backend.models["vae"], backend.models["disc"]
        sit_module = backend.unwrap("sit")
        logs: Dict[str, torch.Tensor] = {}
        intermediate: Dict[str, object] = {}
        self.last_fault = None

        if images.dtype != torch.uint8:
            raise TypeError(f"images must be uint8 [B,3,H,W], got {images.dtype}")
        if zs is None:
            with backend.autocast():
                zs = encoder_targets(self.encoders, images)
        vae.train()
        sit.train()
        processed = preprocess_images_for_vae(images)
        with backend.autocast():
            posterior, z, recon = vae(processed, noise=posterior_noise)

        # (A) VAE: regularisation + REPA alignment through a frozen, eval-mode SiT.
        sit.eval()
        vae_loss, vae_loss_dict = loss_fn(processed, recon, posterior, global_step, "generator")
        with backend.autocast():
            align = frozen_call(sit_module, z, labels, zs, path_type=config.path_type, weighting=config.weighting,
                                align_only=True, time_input=time_input, noises=noises,
                                align_only_final_layer=config.align_pass_final_layer)
        vae_total = vae_loss + config.vae_align_proj_coeff * align["proj_loss"].mean()
        logs.update(vae_loss=vae_total.detach(), vae_align_loss=align["proj_loss"].detach(),
                    **{k: v.detach() for k, v in vae_loss_dict.items() if k != "total_loss"})
        if not self._check_finite("vae_loss", vae_total):
            return self._give_up(logs, ("vae", "disc", "sit"))
        if keep_intermediate:
            z.retain_grad()
            posterior.parameters.retain_grad()
            recon.retain_grad()
        backend.backward("vae", vae_total)
        if keep_intermediate:
            intermediate.update(
                vae_loss_grad_wrt_z=z.grad.clone(), vae_loss_grad_wrt_moments=posterior.parameters.grad.clone(),
                vae_loss_grad_wrt_recon_image=recon.grad.clone(),
                vae_grads_before_clip={n: p.grad.clone() for n, p in backend.unwrap("vae").named_parameters()
                                       if p.grad is not None})

        # (B) discriminator on the reconstruction from BEFORE the VAE update (Q3).
        d_loss, d_loss_dict = loss_fn(processed, recon.detach(), posterior, global_step, "discriminator")
        logs.update(d_loss=d_loss.detach(),
                    **{k: v.detach() for k, v in d_loss_dict.items() if k != "discriminator_loss"})
        if not self._check_finite("d_loss", d_loss):
            return self._give_up(logs, ("vae", "disc", "sit"))
        backend.backward("disc", d_loss)

        # (C) SiT on the detached latent, train mode, same t and noise as (A) (R3).
        sit.train()
        with backend.autocast():
            out = sit(z.detach(), labels, zs, path_type=config.path_type, weighting=config.weighting,
                      time_input=align["time_input"], noises=align["noises"])
        denoising = out["denoising_loss"].mean()
        sit_loss = denoising + config.proj_coeff * out["proj_loss"].mean()
        logs.update(sit_loss=sit_loss.detach(), denoising_loss=denoising.detach(), proj_loss=out["proj_loss"].detach())
        if not self._check_finite("sit_loss", sit_loss):
            return self._give_up(logs, ("vae", "disc", "sit"))
        backend.backward("sit", sit_loss)
        if keep_intermediate:
            intermediate["sit_grads_before_clip"] = {n: p.grad.clone() for n, p in sit_module.named_parameters()
                                                     if p.grad is not None}

        # Updates. No sub-step's forward depends on another's update (B uses the
        # reconstruction from before the VAE step, C the detached latent), so applying the
        # three updates here, after all backward passes, gives the official numbers and lets
        # a fault anywhere skip the update of EVERY model.
        if backend.sync_step:
            self._update(logs, ("vae", "disc", "sit"))
        backend.end_micro_step()

        if keep_intermediate:
            intermediate.update(
                processed_image=processed, moments=posterior.parameters.detach(), z=z.detach(),
                recon_image=recon.detach(), time_input=align["time_input"], noises=align["noises"],
                vae_loss_dict=vae_loss_dict, vae_generator_loss=vae_loss.detach(), vae_align=align,
                vae_loss_total=vae_total.detach(), d_loss_dict=d_loss_dict, d_loss=d_loss.detach(), sit=out,
                sit_loss=sit_loss.detach())
            logs["intermediate"] = intermediate
        return logs


class LDMStep(_UpdateMixin):
    """SiT training on cached latents with a frozen VAE (``train_ldm_only.py``, spec §9.1):
    z = mean + std * n from cached [2C,h,w] moments (mean and std), the latent BN kept in
    eval mode with the VAE's fixed statistics, pos_embed frozen, label dropout active."""

    def __init__(self, backend, ema: nn.Module, config: StepConfig = StepConfig(), encoders: Sequence[nn.Module] = ()):
        self.backend = backend
        self.ema = ema
        self.config = config
        self.encoders = list(encoders)

    def __call__(self, moments: torch.Tensor, labels: torch.Tensor, zs: Optional[Sequence[torch.Tensor]] = None,
                 images: Optional[torch.Tensor] = None, latent_noise: Optional[torch.Tensor] = None) -> Dict[str, torch.Tensor]:
        backend, config = self.backend, self.config
        sit, sit_module = backend.models["sit"], backend.unwrap("sit")
        self.last_fault = None
        if zs is None:
            if images is None:
                raise ValueError("LDMStep needs either encoder targets zs or the uint8 images to compute them")
            with backend.autocast():
                zs = encoder_targets(self.encoders, images)
        mean, std = moments.float().chunk(2, dim=1)
        if latent_noise is None:
            latent_noise = torch.randn_like(mean)
        z = mean + std * latent_noise
        sit.train()
        sit_module.bn.eval()  # fixed latent statistics for the whole run
        with backend.autocast():
            out = sit(z, labels, zs, path_type=config.path_type, weighting=config.weighting)
        denoising = out["denoising_loss"].mean()
        sit_loss = denoising + config.proj_coeff * out["proj_loss"].mean()
        logs = dict(sit_loss=sit_loss.detach(), denoising_loss=denoising.detach(), proj_loss=out["proj_loss"].detach())
        if not self._check_finite("sit_loss", sit_loss):
            return self._give_up(logs, ("sit",))
        backend.backward("sit", sit_loss)
        if backend.sync_step:
            self._update(logs, ("sit",))
        backend.end_micro_step()
        return logs
