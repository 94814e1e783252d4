"""Interpolation paths and time sampling for flow-matching
(docs/numerics.md#interpolants-and-time-sampling).

Convention: t = 0 is data, t = 1 is pure noise. Only v-prediction is used:
x_t = alpha_t * x + sigma_t * noise, target v* = d_alpha_t * x + d_sigma_t * noise.
"""

import math

import torch

PATH_TYPES = ("linear", "cosine")
WEIGHTINGS = ("uniform", "lognormal")


def check_path_type(path_type: str) -> None:
    if path_type not in PATH_TYPES:
        raise ValueError(f"path_type must be one of {PATH_TYPES}, got {path_type!r}")


def path_coefficients(t: torch.Tensor, path_type: str):
    """Return (alpha_t, sigma_t, d_alpha_t, d_sigma_t) for time tensor ``t``.

    For the linear path the derivatives are Python numbers (-1, 1), as in the official code.
    """
    check_path_type(path_type)
    if path_type == "linear":
        return 1 - t, t, -1, 1
    half_pi_t = t * (math.pi / 2)
    return (
        torch.cos(half_pi_t),
        torch.sin(half_pi_t),
        -math.pi / 2 * torch.sin(half_pi_t),
        math.pi / 2 * torch.cos(half_pi_t),
    )


def sample_time(batch_size: int, weighting: str, path_type: str) -> torch.Tensor:
    """Draw diffusion times of shape [N,1,1,1] (float32, CPU generator, as the official code).

    ``uniform``: t ~ U[0,1). ``lognormal``: s = exp(n), n ~ N(0,1); t = s/(1+s) (linear) or
    (2/pi) atan(s) (cosine). The caller moves the result to the latents' device.
    """
    check_path_type(path_type)
    if weighting == "uniform":
        return torch.rand((batch_size, 1, 1, 1))
    if weighting == "lognormal":
        sigma = torch.randn((batch_size, 1, 1, 1)).exp()
        if path_type == "linear":
            return sigma / (1 + sigma)
        return 2 / math.pi * torch.atan(sigma)
    raise ValueError(f"weighting must be one of {WEIGHTINGS}, got {weighting!r}")


def interpolate(x: torch.Tensor, noise: torch.Tensor, t: torch.Tensor, path_type: str):
    """Return (model_input, v_target) for clean ``x``, ``noise`` and times ``t`` [N,1,1,1]."""
    alpha_t, sigma_t, d_alpha_t, d_sigma_t = path_coefficients(t, path_type)
    model_input = alpha_t * x + sigma_t * noise
    target = d_alpha_t * x + d_sigma_t * noise
    return model_input, target
