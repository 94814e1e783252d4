"""The REPA-E training step and the LDM-only step (docs/step.md).

One REPA-E iteration, in the official order (docs/numerics.md#order-of-the-step), each part a method of
``REPAEStep`` (``vae_forward``, ``vae_backward``, ``discriminator_backward``,
``sit_backward``, ``update_models``) that ``__call__`` runs in turn and the parity tool
runs one by one to inspect:

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
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
from torch._subclasses.fake_tensor import is_fake
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
    # The align pass's final layer feeds no loss, so skipping it changes no number
    # (docs/numerics.md#projectors-and-the-repa-loss).
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


def grad_norm_key(name: str) -> str:
    """The log key of a model's gradient norm: the official trainer's names, which call the
    VAE-loss module's (its trainable part is the discriminator) ``grad_norm_disc``."""
    return "grad_norm_disc" if name == "vae_loss" else f"grad_norm_{name}"


class _TrainingStep:
    """What both steps share: the SiT loss pass, fault handling and the update of their
    models (``MODELS``, backend keys) at the end of a step.

    A non-finite loss or, outside fp16, a non-finite gradient norm makes the step skip the
    optimizer update of every model and the EMA update; ``last_fault`` names what went bad
    and the trainer counts it. Under fp16 a non-finite gradient norm is a loss-scale
    overflow: the scaler skips that optimizer only, as in the official run.

    No check reads a value on the host while the step runs: every loss and norm leaves a
    finite flag on the device (``_watch``), and ``_resolve`` reads all flags with ONE
    host read, after every forward, backward and clipping of the step is queued. Every
    backward therefore runs, also after a bad loss (its gradients are dropped); the
    forwards' buffer updates (BatchNorm running statistics, LeCam averages) are put back
    on a fault, so a NaN reaching a train-mode BatchNorm cannot poison later steps."""

    MODELS: Tuple[str, ...] = ("sit",)
    # Pass (C) updates the latent BatchNorm's statistics; the LDM step keeps them fixed.
    train_latent_bn = True
    last_fault: Optional[str] = None

    def __init__(self, backend, ema: nn.Module, config: StepConfig = StepConfig(), encoders: Sequence[nn.Module] = ()):
        self.backend = backend
        self.ema = ema
        self.config = config
        self.encoders = list(encoders)

    def begin(self) -> None:
        """Start a step: no fault yet, and the models' buffers saved to put back on a fault."""
        self.last_fault = None
        self._flags: List[Tuple[str, torch.Tensor]] = []
        self._buffers = [b for name in self.MODELS for b in self.backend.unwrap(name).buffers()]
        self._saved_buffers = [b.detach().clone() for b in self._buffers]

    def sit_backward(self, z: torch.Tensor, labels: torch.Tensor, zs: Sequence[torch.Tensor], logs: Dict,
                     time_input: Optional[torch.Tensor] = None, noises: Optional[torch.Tensor] = None) -> Dict:
        """The SiT in train mode on the detached latent: denoising + proj_coeff * REPA loss,
        backward into the SiT. Draws t and the noise unless given."""
        backend, config = self.backend, self.config
        sit = backend.models["sit"]
        sit.train()
        if not self.train_latent_bn:
            backend.unwrap("sit").bn.eval()
        with backend.autocast():
            out = sit(z.detach(), labels, zs, path_type=config.path_type, weighting=config.weighting,
                      time_input=time_input, noises=noises)
        denoising = out["denoising_loss"].mean()
        sit_loss = denoising + config.proj_coeff * out["proj_loss"].mean()
        logs.update(sit_loss=sit_loss.detach(), denoising_loss=denoising.detach(), proj_loss=out["proj_loss"].detach())
        self._watch("sit_loss", sit_loss)
        backend.backward("sit", sit_loss)
        return {"sit_loss": sit_loss.detach(), "sit": out}

    def update_models(self, logs: Dict) -> None:
        """Clip, step every model's optimizer and update the EMA (sync micro-steps), or only
        check the losses; a fault skips the update of every model."""
        backend, config, names = self.backend, self.config, self.MODELS
        norms = ({name: backend.clip_grad_norm(name, config.max_grad_norm) for name in names}
                 if backend.sync_step else {})
        bad_losses, bad_norms = self._resolve(norms)
        if not bad_losses:  # the norms of a bad loss's gradients are not logged
            logs.update({grad_norm_key(name): norm.detach() for name, norm in norms.items() if norm is not None})
        if bad_losses:
            self._give_up(bad_losses)
        elif getattr(backend, "checks_grad_norm", True) and any(bad_norms.values()):
            self._give_up([grad_norm_key(name) for name, bad in bad_norms.items() if bad])
        elif backend.sync_step:
            for name in names:
                backend.step(name, overflow=bad_norms.get(name, False))
                if norms[name] is None:
                    norm = backend.grad_norm_after_step(name)
                    if norm is not None:
                        logs[grad_norm_key(name)] = norm.detach()
            update_ema(self.ema, backend.unwrap("sit"), config.ema_decay)
        backend.end_micro_step()

    def _watch(self, name: str, value: torch.Tensor) -> None:
        """Remember on the device whether ``value`` is non-finite (no host read)."""
        self._flags.append((name, torch.isfinite(value.detach()).all().logical_not()))

    def _resolve(self, norms: Dict[str, Optional[torch.Tensor]]) -> Tuple[List[str], Dict[str, bool]]:
        """The step's single host read: the non-finite losses, and per model whether its
        gradient norm is non-finite. Every rank gets the same answer (``any_rank``)."""
        for name, norm in norms.items():
            if norm is not None:
                self._watch(grad_norm_key(name), norm)
        flags = self.backend.any_rank(torch.stack([flag for _, flag in self._flags]).float())
        if flags.device.type == "meta" or is_fake(flags):
            values = [0.0] * len(self._flags)  # shape-only runs (FLOP / memory counting) have no values
        else:
            values = flags.tolist()
        bad = {name: value != 0.0 for (name, _), value in zip(self._flags, values)}
        losses = [name for name, value in bad.items() if value and not name.startswith("grad_norm_")]
        return losses, {name: bad[grad_norm_key(name)] for name, norm in norms.items() if norm is not None}

    def _give_up(self, fault: Sequence[str]) -> None:
        # Every model drops the gradients of its window, on every rank (the flags were
        # agreed), so no backend carries a partial window over.
        self.last_fault = ", ".join(fault)
        if self._buffers:
            with torch.no_grad():
                torch._foreach_copy_(self._buffers, self._saved_buffers)
        for name in self.MODELS:
            self.backend.skip(name)


class REPAEStep(_TrainingStep):
    """Callable training step. Models are reached through ``backend.models`` (keys "sit",
    "vae" and "vae_loss", the VAE-loss module: LPIPS and the discriminator) so that wrapped
    models (DDP, DeepSpeed engines) work unchanged; ``ema`` is a plain SiT copy."""

    MODELS = ("vae", "vae_loss", "sit")

    def __init__(self, backend, ema: nn.Module, config: StepConfig = StepConfig(), encoders: Sequence[nn.Module] = ()):
        super().__init__(backend, ema, config, encoders)
        # REPA-E trains pos_embed from the first step (docs/numerics.md#pos_embed-is-trained):
        # it is in the SiT optimizer and unfrozen by the official per-step requires_grad(model, True).
        backend.unwrap("sit").pos_embed.requires_grad_(True)

    def __call__(
        self,
        images: torch.Tensor,
        labels: torch.Tensor,
        global_step: int,
        zs: Optional[Sequence[torch.Tensor]] = None,
        posterior_noise: Optional[torch.Tensor] = None,
        time_input: Optional[torch.Tensor] = None,
        noises: Optional[torch.Tensor] = None,
    ) -> Dict[str, torch.Tensor]:
        """``images`` uint8 [B,3,H,W], ``labels`` int64 [B]. ``zs`` (encoder targets) are
        computed from the images when not given. ``posterior_noise``, ``time_input`` and
        ``noises`` inject the random draws (otherwise drawn in the official order).
        Returns detached tensors: the 19 logged values of the official trainer (docs/step.md#logged-values),
        grad norms only on synchronising micro-steps."""
        if images.dtype != torch.uint8:
            raise TypeError(f"images must be uint8 [B,3,H,W], got {images.dtype}")
        self.begin()
        if zs is None:
            with self.backend.autocast():
                zs = encoder_targets(self.encoders, images)
        logs: Dict[str, torch.Tensor] = {}
        vae_out = self.vae_forward(images, posterior_noise)
        # (A) VAE: regularisation + REPA alignment through a frozen, eval-mode SiT.
        align = self.vae_backward(vae_out, labels, zs, global_step, logs, time_input, noises)["vae_align"]
        # (B) discriminator on the reconstruction from BEFORE the VAE update
        # (docs/numerics.md#order-of-the-step).
        self.discriminator_backward(vae_out, global_step, logs)
        # (C) SiT on the detached latent, train mode, same t and noise as (A)
        # (docs/numerics.md#two-sit-passes).
        self.sit_backward(vae_out["z"], labels, zs, logs, align["time_input"], align["noises"])
        # Updates. No sub-step's forward depends on another's update (B uses the
        # reconstruction from before the VAE step, C the detached latent), so applying the
        # three updates here, after all backward passes, gives the official numbers and lets
        # a fault anywhere skip the update of EVERY model.
        self.update_models(logs)
        return logs

    def vae_forward(self, images: torch.Tensor, posterior_noise: Optional[torch.Tensor] = None) -> Dict:
        """The VAE in train mode on the uint8 images: the [-1, 1] images, the posterior, its
        sample z (``posterior_noise`` or a fresh draw) and the reconstruction."""
        vae = self.backend.models["vae"]
        vae.train()
        processed = preprocess_images_for_vae(images)
        with self.backend.autocast():
            posterior, z, recon = vae(processed, noise=posterior_noise)
        return {"processed_image": processed, "posterior": posterior, "z": z, "recon_image": recon}

    def vae_backward(self, vae_out: Dict, labels: torch.Tensor, zs: Sequence[torch.Tensor], global_step: int,
                     logs: Dict, time_input: Optional[torch.Tensor] = None,
                     noises: Optional[torch.Tensor] = None) -> Dict:
        """(A) The VAE loss: regularisation (L1 + LPIPS + KL + GAN against a frozen
        discriminator) + vae_align_proj_coeff * the REPA loss of an align-only pass of the
        frozen, eval-mode SiT (stops after block encoder_depth; its gradient reaches the VAE
        through z); backward into the VAE. The align pass draws t and the noise unless given."""
        backend, config = self.backend, self.config
        backend.models["sit"].eval()
        generator_loss, loss_dict = backend.models["vae_loss"](vae_out["processed_image"], vae_out["recon_image"],
                                                               vae_out["posterior"], global_step, "generator")
        with backend.autocast():
            align = frozen_call(backend.unwrap("sit"), vae_out["z"], labels, zs, path_type=config.path_type,
                                weighting=config.weighting, align_only=True, time_input=time_input, noises=noises,
                                align_only_final_layer=config.align_pass_final_layer)
        total = generator_loss + config.vae_align_proj_coeff * align["proj_loss"].mean()
        logs.update(vae_loss=total.detach(), vae_align_loss=align["proj_loss"].detach(),
                    **{k: v.detach() for k, v in loss_dict.items() if k != "total_loss"})
        self._watch("vae_loss", total)
        backend.backward("vae", total)
        return {"vae_loss_total": total.detach(), "vae_generator_loss": generator_loss.detach(),
                "vae_loss_dict": loss_dict, "vae_align": align}

    def discriminator_backward(self, vae_out: Dict, global_step: int, logs: Dict) -> Dict:
        """(B) The discriminator's hinge loss on the real images and the DETACHED
        reconstruction; backward into the VAE-loss module."""
        d_loss, d_loss_dict = self.backend.models["vae_loss"](vae_out["processed_image"],
                                                              vae_out["recon_image"].detach(),
                                                              vae_out["posterior"], global_step, "discriminator")
        logs.update(d_loss=d_loss.detach(), **{k: v.detach() for k, v in d_loss_dict.items() if k != "discriminator_loss"})
        self._watch("d_loss", d_loss)
        self.backend.backward("vae_loss", d_loss)
        return {"d_loss": d_loss.detach(), "d_loss_dict": d_loss_dict}


class LDMStep(_TrainingStep):
    """SiT training on cached latents with a frozen VAE (``train_ldm_only.py``,
    docs/step.md#the-ldm-only-step): z = mean + std * n from cached [2C,h,w] moments (mean and
    std), the latent BN kept in eval mode with the VAE's fixed statistics, pos_embed frozen,
    label dropout active."""

    train_latent_bn = False  # fixed latent statistics for the whole run

    def __call__(self, moments: torch.Tensor, labels: torch.Tensor, zs: Optional[Sequence[torch.Tensor]] = None,
                 images: Optional[torch.Tensor] = None, latent_noise: Optional[torch.Tensor] = None) -> Dict[str, torch.Tensor]:
        self.begin()
        if zs is None:
            if images is None:
                raise ValueError("LDMStep needs either encoder targets zs or the uint8 images to compute them")
            with self.backend.autocast():
                zs = encoder_targets(self.encoders, images)
        mean, std = moments.float().chunk(2, dim=1)
        if latent_noise is None:
            latent_noise = torch.randn_like(mean)
        logs: Dict[str, torch.Tensor] = {}
        self.sit_backward(mean + std * latent_noise, labels, zs, logs)
        self.update_models(logs)
        return logs
