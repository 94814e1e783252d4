"""Reading weights from local files with clear errors (``.pt``, ``.pth``, ``.safetensors``).

Nothing here downloads anything. Official training checkpoints are dicts with ``model``,
``ema``, ``vae``, ``discriminator`` ... entries; ``load_state_dict_file(path, key="ema")``
picks one. Wrapper prefixes (``module.`` from DDP, ``_orig_mod.`` from torch.compile) are
stripped.
"""

import os
import pickle
import re
from typing import Dict, Optional

import torch
import torch.nn as nn

from ..errors import RepaEFastError

WRAPPER_PREFIXES = ("module.", "_orig_mod.")


class CheckpointError(RepaEFastError, ValueError):
    """A checkpoint that does not fit the model: names the file and every problem."""


def strip_wrapper_prefixes(state_dict: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    cleaned = {}
    for key, value in state_dict.items():
        changed = True
        while changed:
            changed = False
            for prefix in WRAPPER_PREFIXES:
                if key.startswith(prefix):
                    key = key[len(prefix):]
                    changed = True
        cleaned[key] = value
    return cleaned


def _allowed_globals() -> list:
    """The non-tensor types our and the official checkpoints pickle: ``argparse.Namespace`` (the
    official ``args`` entry, docs/numerics.md#checkpoint-args-is-a-namespace) and the pieces of
    a numpy array (the numpy RNG state in ``rng/rank*.pt``). Files written by numpy 1 name
    ``numpy.core`` where numpy 2 names ``numpy._core``; both spellings map to the same
    function."""
    import argparse

    import numpy as np

    try:
        from numpy._core.multiarray import _reconstruct
    except ImportError:  # numpy 1
        from numpy.core.multiarray import _reconstruct
    allowed = [argparse.Namespace, np.ndarray, np.dtype, type(np.dtype(np.uint32)),
               (_reconstruct, "numpy.core.multiarray._reconstruct"),
               (_reconstruct, "numpy._core.multiarray._reconstruct")]
    return allowed


def safe_torch_load(path, map_location="cpu", *, mmap: bool = False, extra_globals=()):
    """``torch.load`` that can never run code from the file: ``weights_only=True`` with an
    explicit allow-list (``_allowed_globals`` plus ``extra_globals``). A file that pickles
    anything else (a crafted ``__reduce__`` calling ``os.system``, say) is refused with a
    one-line ``CheckpointError`` naming the file and the refused global."""
    try:
        with torch.serialization.safe_globals([*_allowed_globals(), *extra_globals]):
            return torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as error:
        # torch's message is many lines of advice; the refused global is what matters.
        found = re.search(r"[Uu]nsupported (?:global: )?GLOBAL [^\s,]+", str(error))
        if found:
            raise CheckpointError(f"refusing to load {path}: it is not a plain weights file ({found.group(0)}); "
                                  f"nothing in it was run") from None
        lines = [line.strip() for line in str(error).splitlines() if line.strip()]
        details = [line for line in lines if not line.startswith("Check the documentation")]
        reason = details[-1] if details else type(error).__name__
        raise CheckpointError(f"could not read checkpoint {path}: {reason} (damaged, or not a torch file); "
                              f"nothing in it was run") from None
    except (RuntimeError, EOFError) as error:  # not a torch zip file, truncated
        first = str(error).strip().splitlines()[0] if str(error).strip() else ""
        raise CheckpointError(f"could not read checkpoint {path}: {type(error).__name__}: {first}") from None


def read_checkpoint_file(path, map_location="cpu", *, mmap: bool = False):
    """``safe_torch_load`` where any failure to read is a one-line ``CheckpointError`` naming
    the file (the callers that show errors to users want no traceback)."""
    try:
        return safe_torch_load(path, map_location, mmap=mmap)
    except CheckpointError:
        raise
    except Exception as error:  # noqa: BLE001 - re-raised with the file named
        raise CheckpointError(f"could not read checkpoint {path}: {type(error).__name__}: {error}") from error


def load_state_dict_file(path: str, key: Optional[str] = None, map_location="cpu") -> Dict[str, torch.Tensor]:
    """Read a state dict from ``path``. ``key`` selects an entry of a checkpoint dict
    (e.g. "ema"); without it a dict of tensors is returned as is, and a dict with a single
    conventional entry (``state_dict``, ``model``) is unwrapped."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if os.path.isdir(path):
        raise IsADirectoryError(f"expected a checkpoint file, got a directory: {path}")
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        state = load_file(path, device=str(map_location))
    else:
        state = read_checkpoint_file(path, map_location)
    if not isinstance(state, dict):
        raise CheckpointError(f"{path} holds a {type(state).__name__}, expected a dict of tensors")
    if key is not None:
        if key not in state:
            raise CheckpointError(f"{path} has no entry {key!r}; it has {sorted(state)}")
        state = state[key]
    elif not all(isinstance(v, torch.Tensor) for v in state.values()):
        for conventional in ("state_dict", "model"):
            if conventional in state and isinstance(state[conventional], dict):
                state = state[conventional]
                break
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{path}{'[' + repr(key) + ']' if key else ''} is not a state dict of tensors")
    return strip_wrapper_prefixes(state)


def check_state_dict(module: nn.Module, state_dict: Dict[str, torch.Tensor], name: str) -> None:
    """Raise CheckpointError listing missing keys, unexpected keys and shape mismatches."""
    expected = module.state_dict()
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    mismatched = [
        f"{k}: checkpoint {tuple(state_dict[k].shape)} vs model {tuple(expected[k].shape)}"
        for k in expected
        if k in state_dict and tuple(state_dict[k].shape) != tuple(expected[k].shape)
    ]
    if missing or unexpected or mismatched:
        lines = [f"checkpoint does not match {name}:"]

        def listing(title, items):
            if items:
                shown = items[:20] + ([f"... and {len(items) - 20} more"] if len(items) > 20 else [])
                lines.append(f"  {title} ({len(items)}): " + ", ".join(shown))

        listing("missing keys", missing)
        listing("unexpected keys", unexpected)
        listing("shape mismatches", mismatched)
        raise CheckpointError("\n".join(lines))


def load_state_dict_strict(module: nn.Module, state_dict: Dict[str, torch.Tensor], name: str) -> None:
    """Strict load that reports every problem at once (and loads nothing if any)."""
    state_dict = strip_wrapper_prefixes(state_dict)
    check_state_dict(module, state_dict, name)
    module.load_state_dict(state_dict, strict=True)


def load_weights(module: nn.Module, path: str, key: Optional[str] = None, name: Optional[str] = None) -> nn.Module:
    """``load_weights(vae, "pretrained/sdvae/sdvae-f8d4.pt")`` or
    ``load_weights(sit, "checkpoints/0400000.pt", key="ema")``: strict, with clear errors."""
    label = name or type(module).__name__
    load_state_dict_strict(module, load_state_dict_file(path, key), f"{label} (from {path})")
    return module


def load_latents_stats(path: str) -> Dict[str, torch.Tensor]:
    """Read ``<vae>-latents-stats.pt``: ``latents_scale`` and ``latents_bias`` [1, C, 1, 1]."""
    if not os.path.exists(path):
        raise FileNotFoundError(
            f"latent statistics not found: {path} (published next to each VAE as '<vae name>-latents-stats.pt')"
        )
    stats = safe_torch_load(path)
    for key in ("latents_scale", "latents_bias"):
        if key not in stats:
            raise CheckpointError(f"{path} has no {key!r} entry; it has {sorted(stats)}")
    return {"latents_scale": stats["latents_scale"].float(), "latents_bias": stats["latents_bias"].float()}
