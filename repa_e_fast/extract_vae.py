"""Extract the end-to-end tuned VAE (E2E-VAE) from a REPA-E training checkpoint (the official
``save_vae_weights.py``; docs/workflows.md#repa_e_fastextract_vae).

    python -m repa_e_fast.extract_vae --ckpt exps/run/checkpoints/0400000.pt --save-dir pretrained --name e2e-sdvae
    python -m repa_e_fast.extract_vae --exp-path exps/run --train-steps 400000 --name e2e-sdvae

Writes, under ``<save-dir>/<name>/``:
- ``<name>.pt``: the VAE state dict (``ckpt["vae"]``, LDM key names);
- ``<name>-latents-stats.pt``: ``latents_scale = rsqrt(ema bn.running_var)`` and
  ``latents_bias = ema bn.running_mean``, both [1, C, 1, 1]: the EMA model's BatchNorm
  buffers (docs/numerics.md#e2e-vae-latent-statistics), not the live model's and not a dataset pass;
- ``<name>-discriminator-ckpt.pt``: ``ckpt["discriminator"]``.

The VAE is loaded strictly into ``build_vae`` before anything is written, and every file
appears atomically (temporary file in the same folder, then ``os.replace``).
"""

import argparse
import os
import sys
import tempfile
from typing import Dict, Optional

import torch

from .engine.official_format import checkpoint_entry, load_vae, read_checkpoint
from .models.vae import VAE_LAYOUTS


def save_atomically(obj, path: str) -> None:
    handle, temp_path = tempfile.mkstemp(dir=os.path.dirname(os.path.abspath(path)), suffix=".tmp")
    os.close(handle)
    try:
        torch.save(obj, temp_path)
        os.replace(temp_path, path)
    finally:
        if os.path.exists(temp_path):
            os.remove(temp_path)


def vae_layout(vae_state: Dict[str, torch.Tensor], checkpoint: Dict, source: str) -> str:
    """The run's ``args.vae`` when recorded, else the layout whose latent width matches."""
    arguments = checkpoint.get("args")
    arguments = vars(arguments) if isinstance(arguments, argparse.Namespace) else arguments
    if isinstance(arguments, dict) and arguments.get("vae") in VAE_LAYOUTS:
        return arguments["vae"]
    width = vae_state["post_quant_conv.weight"].shape[0] if "post_quant_conv.weight" in vae_state else None
    for layout, config in VAE_LAYOUTS.items():
        if config["embed_dim"] == width:
            return layout
    raise ValueError(f"cannot tell the VAE layout of {source}: no args.vae and latent width {width}")


def extract_vae(checkpoint_path: str, save_dir: str, name: str, with_discriminator: bool = True) -> Dict[str, str]:
    """Write the E2E-VAE files; returns their paths by kind (vae, latents_stats, discriminator)."""
    checkpoint = read_checkpoint(checkpoint_path)
    vae_state = checkpoint_entry(checkpoint, "vae", checkpoint_path,
                                 "not a REPA-E checkpoint: LDM-only runs have no VAE")
    ema = checkpoint_entry(checkpoint, "ema", checkpoint_path, "the latent statistics come from the EMA BatchNorm")
    for key in ("bn.running_mean", "bn.running_var"):
        if key not in ema:
            raise ValueError(f"{checkpoint_path}['ema'] has no {key!r}: not a REPA-E SiT with latent BatchNorm")
    discriminator = None
    if with_discriminator:
        discriminator = checkpoint_entry(checkpoint, "discriminator", checkpoint_path,
                                         "pass --no-discriminator to write only the VAE and its statistics")

    # Check the weights before writing anything: they must load strictly into our VAE.
    layout = vae_layout(vae_state, checkpoint, f"{checkpoint_path}['vae']")
    load_vae(layout, vae_state, f"{checkpoint_path}['vae']")
    channels = ema["bn.running_var"].numel()
    if channels != VAE_LAYOUTS[layout]["embed_dim"]:
        raise ValueError(
            f"EMA BatchNorm has {channels} channels, the {layout} VAE has {VAE_LAYOUTS[layout]['embed_dim']}"
        )

    out_dir = os.path.join(save_dir, name)
    os.makedirs(out_dir, exist_ok=True)
    paths = {
        "vae": os.path.join(out_dir, f"{name}.pt"),
        "latents_stats": os.path.join(out_dir, f"{name}-latents-stats.pt"),
    }
    # clone(): own storage, so a view never drags a larger buffer into the file.
    save_atomically({key: value.clone() for key, value in vae_state.items()}, paths["vae"])
    stats = {
        "latents_scale": ema["bn.running_var"].float().rsqrt().view(1, channels, 1, 1).clone(),
        "latents_bias": ema["bn.running_mean"].float().view(1, channels, 1, 1).clone(),
    }
    save_atomically(stats, paths["latents_stats"])
    if discriminator is not None:
        paths["discriminator"] = os.path.join(out_dir, f"{name}-discriminator-ckpt.pt")
        save_atomically({key: value.clone() for key, value in discriminator.items()}, paths["discriminator"])
    return paths


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m repa_e_fast.extract_vae",
        description="Save the E2E-VAE, its latent statistics and its discriminator from a REPA-E checkpoint.",
    )
    parser.add_argument("--ckpt", "--repae-ckpt", dest="ckpt", default=None, help="REPA-E training checkpoint file")
    parser.add_argument("--exp-path", default=None, help="official experiment directory (instead of --ckpt)")
    parser.add_argument("--train-steps", default=None, help="checkpoint step under --exp-path")
    parser.add_argument("--name", "--vae-name", dest="name", required=True, help="output name, e.g. e2e-sdvae")
    parser.add_argument("--save-dir", default="pretrained", help="files go to <save-dir>/<name>/")
    parser.add_argument("--discriminator", action=argparse.BooleanOptionalAction, default=True,
                        help="also save <name>-discriminator-ckpt.pt (needs the checkpoint's 'discriminator')")
    return parser


def main(argv: Optional[list] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if bool(args.ckpt) == bool(args.exp_path):
            raise ValueError("give either --ckpt FILE or --exp-path DIR --train-steps N")
        if args.exp_path:
            if args.train_steps is None:
                raise ValueError("--exp-path needs --train-steps")
            from .engine.checkpoint import official_checkpoint_file

            checkpoint_path = official_checkpoint_file(args.exp_path, args.train_steps)
        else:
            checkpoint_path = args.ckpt
        paths = extract_vae(checkpoint_path, args.save_dir, args.name, with_discriminator=args.discriminator)
    except (OSError, ValueError) as error:  # CheckpointError is a ValueError
        print(f"error: {error}", file=sys.stderr)
        return 2
    for kind, path in paths.items():
        print(f"saved {kind}: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
