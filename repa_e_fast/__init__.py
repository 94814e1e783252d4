"""repa_e_fast: a training engine for REPA-E (end-to-end VAE + SiT with REPA alignment)."""

__version__ = "0.1.0"
