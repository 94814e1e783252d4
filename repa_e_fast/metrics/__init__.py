"""Sample-quality metrics with the ADM (guided-diffusion) evaluation suite's definitions:
FID and sFID (``fid``), Inception Score (``inception_score``), improved precision / recall
(``precision_recall``), and the FID InceptionV3 network that produces their features
(``inception``; weights from a local ``pt_inception-2015-12-05-6726825d.pth``)."""

from .fid import feature_statistics, frechet_distance, trace_sqrt_product
from .inception import DEFAULT_INCEPTION_PATH, InceptionV3, load_inception, resolve_inception_path, tf1_resize_bilinear
from .inception_score import inception_score, softmax
from .precision_recall import manifold_radii, pairwise_squared_distances, precision_recall

__all__ = [
    "DEFAULT_INCEPTION_PATH", "InceptionV3", "feature_statistics", "frechet_distance", "inception_score",
    "load_inception", "manifold_radii", "trace_sqrt_product", "pairwise_squared_distances", "precision_recall",
    "resolve_inception_path", "softmax", "tf1_resize_bilinear",
]
