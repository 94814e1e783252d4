"""Improved precision and recall (Kynkäänniemi et al. 2019) as the ADM evaluator computes them.

Each feature set defines a manifold: the union of balls around its points whose radius is the
distance to the point's k-th nearest neighbour in the same set (k = 3; the point itself is the
0-th). Precision = fraction of sample features inside the reference manifold; recall =
fraction of reference features inside the sample manifold. Distances are squared Euclidean,
"inside" is ``<=``, as in the evaluator.

Deviation: the ADM evaluator computes the distance blocks in float16 when they are finite
(a speed shortcut); here they are float32 throughout (on the features' device), which can
move points that sit on a ball's boundary.
"""

from typing import Tuple

import torch


def pairwise_squared_distances(u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """``max(|u|^2 - 2 u.v + |v|^2, 0)`` for all row pairs: [len(u), len(v)]."""
    norm_u = u.square().sum(1, keepdim=True)
    norm_v = v.square().sum(1, keepdim=True).t()
    return (norm_u - 2 * u @ v.t() + norm_v).clamp_min(0)


def manifold_radii(features: torch.Tensor, k: int = 3, batch_size: int = 10000) -> torch.Tensor:
    """Squared distance of every point to its k-th nearest neighbour in ``features`` [N, D]."""
    if features.dim() != 2 or features.shape[0] < k + 1:
        raise ValueError(f"need at least k + 1 = {k + 1} feature vectors [N, D], got shape {tuple(features.shape)}")
    radii = []
    for start in range(0, features.shape[0], batch_size):
        distances = pairwise_squared_distances(features[start:start + batch_size], features)
        radii.append(distances.kthvalue(k + 1, dim=1).values)  # k + 1 counts the point itself
    return torch.cat(radii)


def precision_recall(
    reference: torch.Tensor, samples: torch.Tensor, k: int = 3, batch_size: int = 10000
) -> Tuple[float, float]:
    """(precision, recall) of ``samples`` against ``reference`` (both [N, D], same D)."""
    reference, samples = reference.float(), samples.float()
    if reference.shape[1:] != samples.shape[1:]:
        raise ValueError(f"feature sizes differ: reference {tuple(reference.shape)}, samples {tuple(samples.shape)}")
    reference_radii = manifold_radii(reference, k, batch_size)
    sample_radii = manifold_radii(samples, k, batch_size)
    sample_inside = torch.zeros(samples.shape[0], dtype=torch.bool, device=samples.device)
    reference_inside = torch.zeros(reference.shape[0], dtype=torch.bool, device=reference.device)
    for start_r in range(0, reference.shape[0], batch_size):
        block_r = reference[start_r:start_r + batch_size]
        radii_r = reference_radii[start_r:start_r + batch_size]
        for start_s in range(0, samples.shape[0], batch_size):
            distances = pairwise_squared_distances(block_r, samples[start_s:start_s + batch_size])
            radii_s = sample_radii[start_s:start_s + batch_size]
            sample_inside[start_s:start_s + batch_size] |= (distances <= radii_r[:, None]).any(dim=0)
            reference_inside[start_r:start_r + batch_size] |= (distances <= radii_s[None, :]).any(dim=1)
    return sample_inside.double().mean().item(), reference_inside.double().mean().item()
