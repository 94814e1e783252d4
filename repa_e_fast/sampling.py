"""Samplers with the official REPA-E numerics (docs/sampling.md).

Both samplers integrate from noise (t = 1) to data (t = 0) on NORMALISED latents with
``model.inference(x, t, y)`` as the velocity network. The state is kept in float64; every
network call sees ``x`` and ``t`` in the dtype of ``latents`` and its output is cast back
to float64, as in the official ``samplers.py``.

Classifier-free guidance (docs/sampling.md#classifier-free-guidance): when ``cfg_scale > 1`` and
``guidance_low <= t_cur <= guidance_high`` (inclusive) the network is evaluated on
``[x; x]`` with labels ``[y; null]`` (conditional half first) and the halves are combined
as ``uncond + cfg_scale * (cond - uncond)``.

Deviation from the official code (docs/numerics.md#label-dropout-and-the-null-label): the
official samplers hard-code the null label 1000. Here ``null_label=None`` means
``model.num_classes``, which is 1000 for the published ImageNet models (numerically
identical there) and the correct CFG row of the label table for any other class count.

Use ``denormalize_latents`` on the result before decoding with the VAE.
"""

import math
import numbers
from typing import Callable, Optional

import torch

from .losses.interpolants import check_path_type, path_coefficients

SDE_LAST_TIME = 0.04  # the SDE grid stops at 0.04, then takes one deterministic step to 0


def denormalize_latents(x: torch.Tensor, latents_scale, latents_bias) -> torch.Tensor:
    """Normalised latents -> VAE latents: ``x / scale + bias`` (no eps, docs/numerics.md#latent-batchnorm).

    ``latents_scale`` / ``latents_bias`` broadcast against ``x``, e.g. shape ``[1, C, 1, 1]``
    (a REPA-E checkpoint gives ``scale = rsqrt(ema["bn.running_var"])``,
    ``bias = ema["bn.running_mean"]``).
    """
    return x / latents_scale + latents_bias


# ----------------------------------------------------------------------------------------
# Validation (everything is checked before the first network call)
# ----------------------------------------------------------------------------------------
def _validate(model, latents, y, num_steps, cfg_scale, guidance_low, guidance_high, null_label) -> Optional[int]:
    """Check the arguments; return the null label to use (None when guidance is off)."""
    if getattr(model, "training", False):
        raise RuntimeError(
            "the model is in training mode: call model.eval() before sampling "
            "(label dropout depends on the module mode: a training-mode SiT would drop labels at random)"
        )
    if not hasattr(model, "inference"):
        raise TypeError("model must have an inference(x, t, y) method returning the velocity")
    if isinstance(num_steps, bool) or not isinstance(num_steps, int) or num_steps < 1:
        raise ValueError(f"num_steps must be an integer >= 1, got {num_steps!r}")
    if not torch.is_tensor(latents) or not latents.is_floating_point():
        raise TypeError("latents must be a floating-point tensor [N, C, H, W]")
    if not torch.is_tensor(y) or y.dim() != 1 or y.shape[0] != latents.shape[0] or y.is_floating_point():
        raise ValueError(f"y must be an integer tensor [N] with N = latents.shape[0] = {latents.shape[0]}")
    for name, value in (("cfg_scale", cfg_scale), ("guidance_low", guidance_low), ("guidance_high", guidance_high)):
        if not isinstance(value, numbers.Real) or isinstance(value, bool) or not math.isfinite(value):
            raise ValueError(f"{name} must be a finite number, got {value!r}")
    if cfg_scale < 1:
        raise ValueError(f"cfg_scale must be >= 1 (1 = no guidance), got {cfg_scale}")
    if not 0.0 <= guidance_low <= guidance_high <= 1.0:
        raise ValueError(
            f"the guidance interval must satisfy 0 <= guidance_low <= guidance_high <= 1, "
            f"got [{guidance_low}, {guidance_high}]"
        )
    if cfg_scale == 1:
        return None  # the official samplers guide only when cfg_scale > 1
    if null_label is None:
        if not hasattr(model, "num_classes"):
            raise ValueError("cfg_scale > 1 needs a null label: pass null_label or give the model num_classes")
        null_label = int(model.num_classes)
    if isinstance(null_label, bool) or not isinstance(null_label, numbers.Integral):
        raise ValueError(f"null_label must be an integer class index, got {null_label!r}")
    # A SiT trained without label dropout has no null row: guidance would index past the table.
    table = getattr(getattr(model, "y_embedder", None), "embedding_table", None)
    if table is not None and not 0 <= null_label < table.num_embeddings:
        raise ValueError(
            f"null label {null_label} is not a row of the label table ({table.num_embeddings} rows): "
            "a model trained with class_dropout_prob = 0 cannot use classifier-free guidance"
        )
    return null_label


def _network(
    model,
    x: torch.Tensor,
    t: float,
    y: torch.Tensor,
    null_y: Optional[torch.Tensor],
    guided: bool,
    cfg_scale: float,
    dtype: torch.dtype,
    transform: Optional[Callable[[torch.Tensor, torch.Tensor, float], torch.Tensor]] = None,
) -> torch.Tensor:
    """One (possibly guided) network evaluation at time ``t``; float64 in, float64 out.

    ``transform(v, x_in, t)`` maps the velocity to the quantity that is guided (the SDE
    guides its drift, computed on the doubled batch as the official code does).
    """
    x_in, y_in = (torch.cat([x, x]), torch.cat([y, null_y])) if guided else (x, y)
    time = torch.full((x_in.shape[0],), t, dtype=torch.float64, device=x.device)
    out = model.inference(x_in.to(dtype), time.to(dtype), y_in).to(torch.float64)
    if transform is not None:
        out = transform(out, x_in, t)
    if not guided:
        return out
    cond, uncond = out.chunk(2)
    return uncond + cfg_scale * (cond - uncond)


def _guidance_on(cfg_scale: float, t: float, low: float, high: float) -> bool:
    return cfg_scale > 1 and low <= t <= high


# ----------------------------------------------------------------------------------------
# Euler / Heun ODE sampler (docs/sampling.md#euler-ode-sampler)
# ----------------------------------------------------------------------------------------
@torch.no_grad()
def euler_sampler(
    model,
    latents: torch.Tensor,
    y: torch.Tensor,
    num_steps: int = 20,
    heun: bool = False,
    cfg_scale: float = 1.0,
    guidance_low: float = 0.0,
    guidance_high: float = 1.0,
    null_label: Optional[int] = None,
    path_type: str = "linear",
) -> torch.Tensor:
    """Integrate the probability-flow ODE from ``latents`` (noise, t = 1) to t = 0.

    Grid ``linspace(1, 0, num_steps + 1)`` (float64). Euler steps; with ``heun`` every step
    but the last adds a corrector evaluation at ``(x_next, t_next)`` whose guidance on/off
    is decided by ``t_cur`` (official behaviour). Network calls: ``num_steps`` (Euler) or
    ``2 * num_steps - 1`` (Heun), each on a doubled batch when guided.
    ``path_type`` is accepted for a uniform signature and ignored (the network predicts the
    velocity directly). Returns float64 normalised latents.
    """
    check_path_type(path_type)
    null_label = _validate(model, latents, y, num_steps, cfg_scale, guidance_low, guidance_high, null_label)
    dtype, y = latents.dtype, y.to(latents.device)
    null_y = None if null_label is None else torch.full_like(y, null_label)
    times = torch.linspace(1, 0, num_steps + 1, dtype=torch.float64).tolist()

    x = latents.to(torch.float64)
    for i in range(num_steps):
        t_cur, t_next = times[i], times[i + 1]
        guided = _guidance_on(cfg_scale, t_cur, guidance_low, guidance_high)
        d = _network(model, x, t_cur, y, null_y, guided, cfg_scale, dtype)
        x_next = x + (t_next - t_cur) * d
        if heun and i < num_steps - 1:
            d_prime = _network(model, x_next, t_next, y, null_y, guided, cfg_scale, dtype)
            x_next = x + (t_next - t_cur) * (0.5 * d + 0.5 * d_prime)
        x = x_next
    return x


# ----------------------------------------------------------------------------------------
# Euler-Maruyama SDE sampler (docs/sampling.md#euler-maruyama-sde-sampler)
# ----------------------------------------------------------------------------------------
def score_from_velocity(v: torch.Tensor, x: torch.Tensor, t: float, path_type: str) -> torch.Tensor:
    """Score of x_t from the predicted velocity (both paths): ``(r v - x) / (sigma^2 - r sigma' sigma)``
    with ``r = alpha / alpha'``; linear: ``(-(1 - t) v - x) / t``."""
    alpha, sigma, d_alpha, d_sigma = path_coefficients(torch.tensor(t, dtype=torch.float64), path_type)
    ratio = alpha / d_alpha
    variance = sigma**2 - ratio * d_sigma * sigma
    return (ratio * v - x) / variance


@torch.no_grad()
def euler_maruyama_sampler(
    model,
    latents: torch.Tensor,
    y: torch.Tensor,
    num_steps: int = 250,
    cfg_scale: float = 1.0,
    guidance_low: float = 0.0,
    guidance_high: float = 1.0,
    path_type: str = "linear",
    null_label: Optional[int] = None,
) -> torch.Tensor:
    """Euler-Maruyama on the reverse SDE with diffusion ``g^2(t) = 2t``.

    Grid ``linspace(1, 0.04, num_steps)`` then 0. Each of the first ``num_steps - 1``
    intervals draws ``torch.randn_like(x)`` (float64, un-doubled shape) BEFORE the network
    call and takes ``x += drift * dt + sqrt(2 t) * sqrt(|dt|) * eps`` with
    ``drift = v - t * score``; guidance combines the drift halves. The last interval
    (0.04 -> 0) is deterministic and returns the mean ``x + dt * drift``. ``num_steps``
    network calls (doubled batch when guided). Returns float64 normalised latents.
    """
    check_path_type(path_type)
    null_label = _validate(model, latents, y, num_steps, cfg_scale, guidance_low, guidance_high, null_label)
    dtype, y = latents.dtype, y.to(latents.device)
    null_y = None if null_label is None else torch.full_like(y, null_label)
    times = torch.linspace(1, SDE_LAST_TIME, num_steps, dtype=torch.float64).tolist() + [0.0]

    def drift(v: torch.Tensor, x_in: torch.Tensor, t: float) -> torch.Tensor:
        diffusion = 2 * t
        return v - 0.5 * diffusion * score_from_velocity(v, x_in, t, path_type)

    x = latents.to(torch.float64)
    for i in range(num_steps - 1):
        t_cur, t_next = times[i], times[i + 1]
        dt = t_next - t_cur
        # Same RNG stream as the official code: one draw per stochastic step, before the model call.
        eps = torch.randn_like(x)
        guided = _guidance_on(cfg_scale, t_cur, guidance_low, guidance_high)
        d = _network(model, x, t_cur, y, null_y, guided, cfg_scale, dtype, transform=drift)
        x = x + d * dt + math.sqrt(2 * t_cur) * (eps * math.sqrt(abs(dt)))

    # Last interval (0.04 -> 0, or 1 -> 0 when num_steps = 1): the mean, no noise.
    t_cur = times[-2]
    guided = _guidance_on(cfg_scale, t_cur, guidance_low, guidance_high)
    d = _network(model, x, t_cur, y, null_y, guided, cfg_scale, dtype, transform=drift)
    return x + (0.0 - t_cur) * d
