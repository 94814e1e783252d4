"""Stage-wise parity of one REPA-E step (``e2e_step``): teacher forcing and measured
sensitivity (issue 17, item 7).

A chained value (the VAE-loss gradient w.r.t. the reconstruction, the SiT loss ...) inherits
the rounding of every stage before it, amplified by its own stage: comparing it with a fixed
tolerance either misses errors or reports false failures (a tiny random-weight GAN loss is
ill-conditioned). So each stage is checked twice:

- **teacher forcing**: the stage alone on the reference's own recorded inputs (the VAE loss,
  the REPA alignment and the discriminator loss on the recorded reconstruction, moments and
  posterior noise; the SiT on the recorded latent), from the initial states, with tight
  tolerances;
- **measured sensitivity** for the chained values: the stage is re-run with its inputs moved
  by the tolerance they were compared with (random signs, seeded), and how far each output
  moves is added (times SENSITIVITY_FACTOR) to that output's chained tolerance.
"""

import copy
from typing import Dict, Tuple

import torch

from .parity import DECODER_ATOL, FORWARD_ATOL, FORWARD_RTOL, Comparator

# Teacher-forced stages: forward values as docs/parity.md#tolerances; gradients relative to each
# tensor's max plus a small share of the largest (entries that are rounding noise,
# docs/numerics.md#the-first-adamw-step).
STAGE_GRAD_RTOL, STAGE_GRAD_GLOBAL_RTOL = 1e-5, 1e-6
SENSITIVITY_FACTOR = 2.0
SENSITIVITY_SEED = 1234


def _loss_outputs(loss_fn, sit, vae, step_config, processed, recon, moments, eps, upstream_grad_recon, labels, zs,
                  time_input, noises, global_step) -> Dict[str, torch.Tensor]:
    """Stages (A) and (B) of the step on given inputs: the VAE loss on ``recon``, the REPA
    alignment on z = mean + std * eps, the discriminator loss. The gradient w.r.t. z and the
    moments also has the decoder's path (recon = decoder(z)): the decoder's backward is fed
    ``upstream_grad_recon`` (the recorded d loss / d recon), so it is checked as a stage too."""
    from .engine.step import frozen_call
    from .models.vae import DiagonalGaussianDistribution

    recon = recon.detach().clone().requires_grad_(True)
    moments = moments.detach().clone().requires_grad_(True)
    posterior = DiagonalGaussianDistribution(moments)
    z = posterior.sample(eps)
    z.retain_grad()
    vae_loss, loss_dict = loss_fn(processed, recon, posterior, global_step, "generator")
    sit.eval()
    align = frozen_call(sit, z, labels, zs, path_type=step_config.path_type, weighting=step_config.weighting,
                        align_only=True, time_input=time_input, noises=noises,
                        align_only_final_layer=step_config.align_pass_final_layer)
    total = vae_loss + step_config.vae_align_proj_coeff * align["proj_loss"].mean()
    decoded = vae.decode(z).sample
    torch.autograd.backward([total, decoded], [None, upstream_grad_recon])
    d_loss, d_dict = loss_fn(processed, recon.detach(), posterior, global_step, "discriminator")
    outputs = {"vae_generator_loss": vae_loss.detach(), "vae_loss_total": total.detach(), "d_loss": d_loss.detach(),
               "vae_align/proj_loss": align["proj_loss"].detach(),
               "vae_loss_grad_wrt_recon_image": recon.grad, "vae_loss_grad_wrt_moments": moments.grad,
               "vae_loss_grad_wrt_z": z.grad}
    outputs.update({f"vae_loss_dict/{k}": v.detach() for k, v in loss_dict.items()})
    outputs.update({f"d_loss_dict/{k}": v.detach() for k, v in d_dict.items()})
    return outputs


def _sit_outputs(sit, step_config, z, labels, zs, time_input, noises) -> Tuple[Dict[str, torch.Tensor], Dict]:
    """Stage (C): the SiT in train mode on a given latent; its loss and parameter gradients."""
    sit.train()
    sit.zero_grad(set_to_none=True)
    out = sit(z.detach(), labels, zs, path_type=step_config.path_type, weighting=step_config.weighting,
              time_input=time_input, noises=noises)
    loss = out["denoising_loss"].mean() + step_config.proj_coeff * out["proj_loss"].mean()
    loss.backward()
    outputs = {"sit_loss": loss.detach(), "sit/denoising_loss": out["denoising_loss"].detach(),
               "sit/proj_loss": out["proj_loss"].detach(), "sit/model_output": out["model_output"].detach()}
    grads = {n: p.grad.clone() for n, p in sit.named_parameters() if p.grad is not None}
    return outputs, grads


def _reference_value(ref: dict, key: str):
    if "/" in key:
        group, name = key.split("/", 1)
        return ref.get(group, {}).get(name)
    return ref.get(key)


def _signs_like(tensor: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    return torch.where(torch.rand(tensor.shape, generator=generator) < 0.5, -1.0, 1.0).to(tensor.dtype)


def _max_abs_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.double() - b.double()).abs().max().item() if a.numel() else 0.0


def check_stages(data: dict, out: Comparator, initial_modules, step_config, processed: torch.Tensor) -> Dict[str, float]:
    """Teacher-forced stage checks; returns the measured sensitivity of every chained output
    (key as in the fixture's ``intermediate``; SiT gradients as ``sit_grads_before_clip/<name>``)."""
    sit0, _ema0, vae0, loss0, _optimizers = initial_modules
    inputs, ref = data["inputs"], data["outputs"]["intermediate"]
    global_step = inputs.get("global_step", 0)
    labels, zs = inputs["labels"], inputs["zs"]
    needed = ("recon_image", "moments", "posterior_eps", "z", "vae_loss_grad_wrt_recon_image", "time_input", "noises")
    if any(key not in ref for key in needed):
        return {}  # a fixture without the recorded stage inputs: chained checks only
    time_input, noises = ref["time_input"], ref["noises"]
    vae0.train()

    def loss_stage(recon, moments):
        return _loss_outputs(copy.deepcopy(loss0), copy.deepcopy(sit0), vae0, step_config, processed, recon, moments,
                             ref["posterior_eps"], ref["vae_loss_grad_wrt_recon_image"], labels, zs, time_input,
                             noises, global_step)

    def sit_stage(z):
        return _sit_outputs(copy.deepcopy(sit0), step_config, z, labels, zs, time_input, noises)

    # Teacher forcing: each stage on the reference's own inputs.
    forced = loss_stage(ref["recon_image"], ref["moments"])
    for key, value in forced.items():
        reference = _reference_value(ref, key)
        if reference is None:
            continue
        if key.startswith("vae_loss_grad"):
            scale = reference.abs().max().item()
            out.add(f"stages/{key}", value, reference, atol=STAGE_GRAD_GLOBAL_RTOL * scale, rtol=STAGE_GRAD_RTOL)
        else:
            out.add(f"stages/{key}", value, reference)
    sit_forced, sit_grads = sit_stage(ref["z"])
    for key, value in sit_forced.items():
        reference = _reference_value(ref, key)
        if reference is not None:
            out.add(f"stages/{key}", value, reference)
    if "sit_grads_before_clip" in ref:
        out.add_grads("stages/sit_grads_before_clip", sit_grads, ref["sit_grads_before_clip"])

    # Sensitivity: the same stages with their inputs moved by their chained tolerance.
    generator = torch.Generator().manual_seed(SENSITIVITY_SEED)

    def moved(tensor, atol):
        tolerance = atol + FORWARD_RTOL * tensor.abs().max().item()
        return tensor + tolerance * _signs_like(tensor, generator)

    shifted = loss_stage(moved(ref["recon_image"], DECODER_ATOL), moved(ref["moments"], FORWARD_ATOL))
    sensitivity = {key: _max_abs_diff(shifted[key], forced[key]) for key in forced}
    sit_shifted, sit_grads_shifted = sit_stage(moved(ref["z"], FORWARD_ATOL))
    sensitivity.update({key: _max_abs_diff(sit_shifted[key], sit_forced[key]) for key in sit_forced})
    sensitivity.update({f"sit_grads_before_clip/{name}": _max_abs_diff(sit_grads_shifted[name], grad)
                        for name, grad in sit_grads.items()})
    return sensitivity


# The logged values of the step and the stage output each one is.
LOG_SOURCES = {"vae_loss": "vae_loss_total", "vae_align_loss": "vae_align/proj_loss", "d_loss": "d_loss",
               "sit_loss": "sit_loss", "denoising_loss": "sit/denoising_loss", "proj_loss": "sit/proj_loss"}
