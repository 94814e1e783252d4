"""repa_e_fast: a training engine for REPA-E (end-to-end VAE + SiT with REPA alignment)."""

import os as _os

__version__ = "0.1.0"

# The Triton kernels live in the top-level ``kernels/`` directory, which setup.py installs
# as ``repa_e_fast.kernels``. When this package is imported straight from a source
# checkout (PYTHONPATH=., or an editable install whose path mapping is not active, as seen
# on one GPU image), let ``import repa_e_fast.kernels`` find that directory too.
_package_dir = _os.path.dirname(_os.path.abspath(__file__))
_checkout_root = _os.path.dirname(_package_dir)
if not _os.path.isdir(_os.path.join(_package_dir, "kernels")) and _os.path.isfile(
    _os.path.join(_checkout_root, "kernels", "__init__.py")
):
    __path__.append(_checkout_root)
