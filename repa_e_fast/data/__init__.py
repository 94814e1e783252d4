"""Data layer: image loaders (DALI on the GPU, PyTorch fallback), dataset tools, demo data.

Importable without the optional dependencies: DALI (``nvidia-dali-cuda120``) is only
imported for ``loader="dali"``/``"auto"`` on CUDA and h5py only for the official
images.h5 layout.
"""

from .demo import ensure_demo_dataset
from .loader import build_image_loader, dali_available
from .sources import DatasetError

__all__ = ["build_image_loader", "ensure_demo_dataset", "DatasetError", "dali_available"]
