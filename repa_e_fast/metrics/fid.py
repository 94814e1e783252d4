"""Fréchet distance between Gaussian fits of features (FID on pool_3, sFID on mixed_6/conv).

The ADM evaluator (after TTUR's ``fid.py``) computes
``||mu1 - mu2||^2 + tr(S1) + tr(S2) - 2 tr(sqrtm(S1 S2))`` with ``scipy.linalg.sqrtm``.

Here the trace term is computed from eigenvalues instead. Factor ``S1 = F F^T`` (Cholesky with
complete pivoting, LAPACK ``dpstrf``, which stops at the numerical rank of a positive
semi-definite matrix, so ``F`` is d x rank). ``S1 S2 = F (F^T S2)`` has the same non-zero
eigenvalues as the symmetric PSD matrix ``F^T S2 F``, hence
``tr(sqrtm(S1 S2)) = sum_i sqrt(eig_i(F^T S2 F))``: the same quantity, computed with one
Cholesky and one symmetric eigenvalue solve. That is several times faster than ``sqrtm``'s
complex Schur form at 2048 dimensions, never complex, and exact for singular covariances
(fewer images than dimensions) without the evaluator's ``eps`` retry. Eigenvalues below the
numerical-rank tolerance ``max|eig| * n * machine eps`` are round-off and count as 0. The tests
check it against closed forms and against ``scipy.linalg.sqrtm``.
"""

from typing import Tuple

import numpy as np
from scipy.linalg import lapack


def feature_statistics(features: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """Mean and unbiased covariance (``np.cov``, ddof=1, as the evaluator) of features [N, D], float64."""
    features = np.asarray(features, dtype=np.float64)
    if features.ndim != 2 or features.shape[0] < 2:
        raise ValueError(f"need features [N, D] with N >= 2 for a covariance, got shape {features.shape}")
    return features.mean(axis=0), np.cov(features, rowvar=False)


def psd_factor(matrix: np.ndarray) -> np.ndarray:
    """``F`` (d x rank) with ``matrix = F @ F.T`` for a symmetric positive semi-definite matrix."""
    factor, pivots, rank, info = lapack.dpstrf(matrix, lower=1)
    if info < 0:
        raise ValueError(f"LAPACK dpstrf rejected argument {-info}")
    lower = np.tril(factor)[:, :rank]  # the upper triangle still holds the input
    unpermuted = np.empty_like(lower)
    unpermuted[pivots - 1] = lower  # dpstrf factors matrix[piv][:, piv]; undo the pivoting
    return unpermuted


def trace_sqrt_product(sigma1: np.ndarray, sigma2: np.ndarray) -> float:
    """``tr(sqrtm(sigma1 @ sigma2))`` for covariance matrices."""
    factor = psd_factor(sigma1)
    middle = factor.T @ sigma2 @ factor
    eigenvalues = np.linalg.eigvalsh((middle + middle.T) / 2)  # exactly symmetric input
    tolerance = np.abs(eigenvalues).max(initial=0.0) * len(eigenvalues) * np.finfo(np.float64).eps
    return float(np.sqrt(eigenvalues[eigenvalues > tolerance]).sum())


def check_statistics(mu, sigma, name: str) -> Tuple[np.ndarray, np.ndarray]:
    """``(mu, sigma)`` as float64, or ``ValueError`` naming ``name``: with a NaN, or a sigma that
    is not a covariance matrix (symmetric positive semi-definite), the distance would be a
    meaningless number (``nan``, or negative) instead of an error."""
    mu, sigma = np.atleast_1d(np.asarray(mu, np.float64)), np.atleast_2d(np.asarray(sigma, np.float64))
    if mu.ndim != 1 or sigma.shape != (mu.shape[0],) * 2:
        raise ValueError(f"{name}: mu {list(mu.shape)} and sigma {list(sigma.shape)} are not [D] and [D, D]")
    for label, array in (("mu", mu), ("sigma", sigma)):
        if not np.isfinite(array).all():
            raise ValueError(f"{name}: {label} has {int((~np.isfinite(array)).sum())} non-finite value(s) (NaN or inf)")
    scale = np.abs(sigma).max(initial=0.0)
    if np.abs(sigma - sigma.T).max(initial=0.0) > 1e-6 * scale:
        raise ValueError(f"{name}: sigma is not symmetric, so not a covariance matrix")
    eigenvalues = np.linalg.eigvalsh(sigma)
    # Round-off leaves tiny negative eigenvalues in a genuine covariance; a real one is not.
    if eigenvalues.size and eigenvalues[0] < -1e-6 * np.abs(eigenvalues).max():
        raise ValueError(f"{name}: sigma is not positive semi-definite (lowest eigenvalue {eigenvalues[0]:.4g}), "
                         "so not a covariance matrix")
    return mu, sigma


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
    mu1, sigma1 = check_statistics(mu1, sigma1, "first statistics")
    mu2, sigma2 = check_statistics(mu2, sigma2, "second statistics")
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape or sigma1.shape != (mu1.shape[0],) * 2:
        raise ValueError(
            f"statistics do not match: mu {mu1.shape} vs {mu2.shape}, sigma {sigma1.shape} vs {sigma2.shape}"
        )
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * trace_sqrt_product(sigma1, sigma2))
