"""Models of REPA-E, key-compatible with the official checkpoints.

- ``SiT`` / ``build_sit("SiT-XL/2", ...)``: the diffusion transformer with REPA projectors
- ``AutoencoderKL`` / ``build_vae("f8d4" | "f16d32")``: the VAE
- ``load_encoders("dinov2-vit-b,clip-vit-L", ...)``: frozen REPA target encoders (DINOv2, MoCo v3, MAE, I-JEPA, CLIP)
- ``LPIPS``, ``NLayerDiscriminator``: the VAE regularisation networks
- ``load_weights`` and friends: strict loading from local files with clear errors
"""

from .checkpoints import CheckpointError, load_latents_stats, load_state_dict_file, load_weights
from .discriminator import NLayerDiscriminator
from .encoders import DinoVisionTransformer, RepresentationEncoder, load_encoders, parse_enc_type, preprocess_raw_image
from .lpips import LPIPS
from .sit import SIT_MODEL_NAMES, SiT, build_sit
from .vae import AutoencoderKL, DiagonalGaussianDistribution, build_vae, preprocess_images_for_vae

__all__ = [
    "AutoencoderKL", "CheckpointError", "DiagonalGaussianDistribution", "DinoVisionTransformer", "LPIPS",
    "NLayerDiscriminator", "RepresentationEncoder", "SIT_MODEL_NAMES", "SiT", "build_sit", "build_vae",
    "load_encoders", "load_latents_stats", "load_state_dict_file", "load_weights", "parse_enc_type",
    "preprocess_images_for_vae", "preprocess_raw_image",
]
