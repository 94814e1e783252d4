"""Build script for repa_e_fast.

The top-level ``kernels/`` directory (raw Triton kernels, no autograd) is the package
``repa_e_fast.kernels`` through one symlink, ``repa_e_fast/kernels -> ../kernels``: a
checkout on PYTHONPATH, an editable install and a wheel (setuptools copies the files) all
see it. C++ sources in ``csrc/`` become the optional native extension ``repa_e_fast._C``;
set ``REPA_E_FAST_NO_NATIVE=1`` to skip compiling it (a pure-Python fallback is then used
wherever the extension would be).

``REPA_E_FAST_OPS_ONLY=1`` installs the package for its fused ops alone
(``repa_e_fast.ops``, ``repa_e_fast.weights``): dependencies torch and triton only, no C++
compile. The training engine's modules are present but need the full install.
"""

import glob
import os

from setuptools import find_packages, setup


OPS_ONLY = os.environ.get("REPA_E_FAST_OPS_ONLY", "0") == "1"
# What repa_e_fast.ops needs; the engine adds ENGINE_REQUIREMENTS.
OPS_REQUIREMENTS = [
    "torch>=2.3",
    "triton; platform_system == 'Linux' and platform_machine == 'x86_64'",
]
ENGINE_REQUIREMENTS = ["numpy", "pillow", "pyyaml", "tqdm", "safetensors", "scipy"]


def native_extensions():
    sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")))
    if not sources or OPS_ONLY or os.environ.get("REPA_E_FAST_NO_NATIVE", "0") == "1":
        return [], {}
    from pybind11.setup_helpers import Pybind11Extension, build_ext

    extension = Pybind11Extension(
        "repa_e_fast._C",
        sources,
        cxx_std=17,
        extra_compile_args=["-O3"],
    )
    return [extension], {"build_ext": build_ext}


ext_modules, cmdclass = native_extensions()

packages = find_packages(include=["repa_e_fast", "repa_e_fast.*"])

setup(
    name="repa_e_fast",
    version="0.1.0",
    description="High-performance REPA-E training engine: SiT + VAE trained end to end with fused Triton kernels",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=packages,
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    install_requires=OPS_REQUIREMENTS + ([] if OPS_ONLY else ENGINE_REQUIREMENTS),
    extras_require={
        "dali": ["nvidia-dali-cuda120"],
        "dali-cuda130": ["nvidia-dali-cuda130"],
        "deepspeed": ["deepspeed"],
        "flash": ["flash-attn"],
        "xformers": ["xformers"],
        "h5": ["h5py"],
        "logging": ["tensorboard", "wandb"],
        # CI installs everything the tests exercise on a CPU: DeepSpeed (CPU accelerator),
        # DALI (CPU-only pipelines), h5py (the official images.h5 layout), diffusers (the
        # ops.patch tests on its real modules; it does not pull torchvision), TensorBoard and
        # W&B (the logging tests, offline).
        "test": ["pytest", "pytest-timeout", "deepspeed", "nvidia-dali-cuda120", "h5py", "diffusers==0.42.1",
                 "tensorboard", "wandb"],
    },
    entry_points={"console_scripts": [
        "repa-e-parity=repa_e_fast.parity:main",
        "repa-e-train=repa_e_fast.train:main",
        "repa-e-generate=repa_e_fast.generate:main",
        "repa-e-evaluate=repa_e_fast.evaluate:main",
        "repa-e-extract-vae=repa_e_fast.extract_vae:main",
        "repa-e-cache-latents=repa_e_fast.cache_latents:main",
        "repa-e-prepare=repa_e_fast.data.prepare:main",
    ]},
)
