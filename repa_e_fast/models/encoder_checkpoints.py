"""The official encoder checkpoint files, read and mapped onto ``vit.VisionTransformer``.

One function per family turns what REPA-E's loader reads into our state dict, with the
same key fixes and position-table resampling (docs/numerics.md#encoder-checkpoints-and-key-fixes):

- DINOv2: the hub file as is; ``head.*`` dropped; ``pos_embed`` resampled (cls kept).
- MoCo v3: entry ``state_dict`` in the MoCo training layout; only ``module.base_encoder.*``
  without ``head.*``; ViT-L's misnamed block 13/14 keys repaired; ``pos_embed`` resampled.
- MAE: entry ``model``; ``pos_embed`` resampled.
- I-JEPA: entry ``encoder``, DDP ``module.`` prefix removed; no cls row in ``pos_embed``.
- CLIP: the ``visual.*`` part of the released TorchScript archive, renamed to our keys
  (``class_embedding`` -> ``cls_token``, ``in_proj_weight`` -> ``attn.qkv.weight`` ...);
  ``proj`` (the image-text projection, unused by REPA-E) dropped; fp16 -> fp32.

Position tables are resampled to the encoder's token grid (16x16 at 256 px); a table that
already has that grid is returned unchanged (I-JEPA and CLIP at 256 px).

The CLIP archive is read without ``torch.jit.load``: its pickled module tree is walked by
a restricted unpickler that only rebuilds tensors, so nothing in the file can run code.
"""

import io
import os
import pickle
import re
import zipfile
from collections import OrderedDict
from typing import Dict

import torch

from .checkpoints import CheckpointError, read_checkpoint_file
from .vit import resample_pos_embed

StateDict = Dict[str, torch.Tensor]


def _entry(raw: dict, key: str, source: str) -> StateDict:
    if not isinstance(raw, dict) or key not in raw:
        found = sorted(raw) if isinstance(raw, dict) else type(raw).__name__
        raise CheckpointError(f"{source} has no {key!r} entry (found {found}); is it the right file?")
    return dict(raw[key])


def _resample(state: StateDict, grid: int, num_prefix_tokens: int) -> StateDict:
    if "pos_embed" in state:
        state["pos_embed"] = resample_pos_embed(state["pos_embed"], grid, num_prefix_tokens)
    return state


def dinov2_to_state_dict(raw: StateDict, grid: int) -> StateDict:
    state = {k: v for k, v in raw.items() if not k.startswith("head.")}
    return _resample(state, grid, 1)


MOCOV3_PREFIX = "module.base_encoder."
# ViT-L MoCo v3 file: block 13's norm1/fc1 and block 14's norm2/fc2 carry the block number.
MOCOV3_RENAMES = (("blocks.13.norm13", "blocks.13.norm1"), ("blocks.13.mlp.fc13", "blocks.13.mlp.fc1"),
                  ("blocks.14.norm14", "blocks.14.norm2"), ("blocks.14.mlp.fc14", "blocks.14.mlp.fc2"))


def mocov3_to_state_dict(raw: dict, grid: int, source: str = "MoCo v3 checkpoint") -> StateDict:
    state = {}
    for key, value in _entry(raw, "state_dict", source).items():
        if not key.startswith(MOCOV3_PREFIX):
            continue  # momentum encoder, predictor
        key = key[len(MOCOV3_PREFIX):]
        for wrong, right in MOCOV3_RENAMES:
            key = key.replace(wrong, right)
        if "head" in key or key.split(".")[0] == "fc":
            continue  # the projection MLP
        state[key] = value
    return _resample(state, grid, 1)


def mae_to_state_dict(raw: dict, grid: int, source: str = "MAE checkpoint") -> StateDict:
    return _resample(_entry(raw, "model", source), grid, 1)


def jepa_to_state_dict(raw: dict, grid: int, source: str = "I-JEPA checkpoint") -> StateDict:
    state = {k.removeprefix("module."): v for k, v in _entry(raw, "encoder", source).items()}
    return _resample(state, grid, 0)


CLIP_TOP_LEVEL = {"class_embedding": "cls_token", "positional_embedding": "pos_embed",
                  "conv1.weight": "patch_embed.proj.weight", "ln_pre.weight": "norm_pre.weight",
                  "ln_pre.bias": "norm_pre.bias", "ln_post.weight": "norm.weight", "ln_post.bias": "norm.bias"}
CLIP_BLOCK = {"ln_1": "norm1", "attn.in_proj_weight": "attn.qkv.weight", "attn.in_proj_bias": "attn.qkv.bias",
              "attn.out_proj": "attn.proj", "ln_2": "norm2", "mlp.c_fc": "mlp.fc1", "mlp.c_proj": "mlp.fc2"}
CLIP_BLOCK_KEY = re.compile(r"transformer\.resblocks\.(\d+)\.(.+)")


def clip_visual_to_state_dict(raw: StateDict, grid: int, prefix: str = "visual.",
                              source: str = "CLIP checkpoint") -> StateDict:
    """``raw``: a CLIP state dict (``visual.*`` + text tower), the vision tower's own state
    dict (no prefix), or with ``prefix="model."`` the state dict of REPA-E's
    ``UpdatedVisionTransformer`` wrapper."""
    if "conv1.weight" in raw and f"{prefix}conv1.weight" not in raw:
        prefix = ""  # torch.save(clip_model.visual.state_dict())
    visual = {k[len(prefix):]: v for k, v in raw.items() if k.startswith(prefix)}
    if not visual:
        raise CheckpointError(f"{source} has no {prefix}* keys; is it a CLIP model?")
    state = {}
    for key, value in visual.items():
        value = value.float()  # the released archive is fp16; clip.load casts to fp32 on CPU
        if key == "proj":
            continue  # image-text projection: loaded, never applied (docs/numerics.md#encoder-targets)
        if key in CLIP_TOP_LEVEL:
            state[CLIP_TOP_LEVEL[key]] = value
            continue
        match = CLIP_BLOCK_KEY.fullmatch(key)
        if match is None:
            raise CheckpointError(f"{source}: unexpected CLIP vision key {prefix}{key}")
        index, rest = match.groups()
        for theirs, ours in CLIP_BLOCK.items():
            if rest == theirs or rest.startswith(theirs + "."):
                state[f"blocks.{index}.{ours}{rest[len(theirs):]}"] = value
                break
        else:
            raise CheckpointError(f"{source}: unexpected CLIP vision key {prefix}{key}")
    if "cls_token" in state:
        state["cls_token"] = state["cls_token"].reshape(1, 1, -1)
    if "pos_embed" in state:
        state["pos_embed"] = state["pos_embed"].unsqueeze(0)
    return _resample(state, grid, 1)


CONVERTERS = {"mocov3": mocov3_to_state_dict, "mae": mae_to_state_dict, "jepa": jepa_to_state_dict}


def official_to_state_dict(family: str, raw: dict, grid: int, source: str) -> StateDict:
    """What the official loader reads from the file -> our encoder's state dict."""
    if family == "dinov2":
        return dinov2_to_state_dict(raw, grid)
    if family == "clip":
        return clip_visual_to_state_dict(raw, grid, source=source)
    return CONVERTERS[family](raw, grid, source)


# ----------------------------------------------------------------------------------------
# Reading files
# ----------------------------------------------------------------------------------------
_STORAGE_DTYPES = {
    "FloatStorage": torch.float32, "HalfStorage": torch.float16, "BFloat16Storage": torch.bfloat16,
    "DoubleStorage": torch.float64, "LongStorage": torch.int64, "IntStorage": torch.int32,
    "ShortStorage": torch.int16, "CharStorage": torch.int8, "ByteStorage": torch.uint8, "BoolStorage": torch.bool,
}


# TorchScript pickles typed lists (e.g. a Conv2d's kernel size) through these helpers.
_TYPED_LISTS = {name: list for name in ("build_intlist", "build_doublelist", "build_boollist", "build_tensorlist")}
_TYPED_LISTS["restore_type_tag"] = lambda value, _type_string: value


class _ScriptObject:
    """Stand-in for a pickled TorchScript module: keeps its attribute dict, nothing else."""

    def __setstate__(self, state):
        self.attributes = state if isinstance(state, dict) else {}


def _rebuild_tensor(storage, offset, size, stride, *_ignored):
    return storage.as_strided(tuple(size), tuple(stride), offset)


class _ArchiveUnpickler(pickle.Unpickler):
    """Unpickles a TorchScript ``data.pkl``: module objects, tensors and plain containers only."""

    def __init__(self, data: bytes, archive: zipfile.ZipFile, root: str, path: str):
        super().__init__(io.BytesIO(data))
        self.archive, self.root, self.path = archive, root, path

    def find_class(self, module, name):
        if module.startswith("__torch__"):
            return type(name, (_ScriptObject,), {})
        if (module, name) in (("torch._utils", "_rebuild_tensor_v2"), ("torch._utils", "_rebuild_tensor")):
            return _rebuild_tensor
        if module == "torch" and name in _STORAGE_DTYPES:
            return _STORAGE_DTYPES[name]
        if (module, name) == ("collections", "OrderedDict"):
            return OrderedDict
        if module == "torch.jit._pickle" and name in _TYPED_LISTS:
            return _TYPED_LISTS[name]
        raise CheckpointError(f"{self.path}: the TorchScript archive refers to {module}.{name}, which this reader "
                              "does not rebuild (only modules and tensors are read)")

    def persistent_load(self, pid):
        kind, dtype, key, _location, numel = pid
        if kind != "storage" or not isinstance(dtype, torch.dtype):
            raise CheckpointError(f"{self.path}: unsupported storage reference {pid!r}")
        data = bytearray(self.archive.read(f"{self.root}/data/{key}"))
        flat = torch.frombuffer(data, dtype=dtype) if data else torch.empty(0, dtype=dtype)
        return flat[:numel]


def _flatten_script_module(obj, prefix: str, out: StateDict, seen: set) -> None:
    if id(obj) in seen:
        return
    seen.add(id(obj))
    for name, value in obj.attributes.items():
        if torch.is_tensor(value):
            out[prefix + name] = value
        elif isinstance(value, _ScriptObject):
            _flatten_script_module(value, f"{prefix}{name}.", out, seen)


def read_torchscript_state_dict(path: str) -> StateDict:
    """The tensors of a ``torch.jit.save``d module, named as its ``state_dict()`` (CLIP's
    ``ViT-L-14.pt``), read without running anything from the archive."""
    with zipfile.ZipFile(path) as archive:
        pickles = [n for n in archive.namelist() if n.count("/") == 1 and n.endswith("/data.pkl")]
        if len(pickles) != 1:
            raise CheckpointError(f"{path} is not a TorchScript archive (no <name>/data.pkl)")
        root = pickles[0].split("/")[0]
        byteorder = f"{root}/byteorder"
        if byteorder in archive.namelist() and archive.read(byteorder).strip() not in (b"little", b""):
            raise CheckpointError(f"{path} was written on a big-endian machine; not supported")
        module = _ArchiveUnpickler(archive.read(pickles[0]), archive, root, path).load()
    if not isinstance(module, _ScriptObject):
        raise CheckpointError(f"{path}: the archive does not hold a module")
    state: StateDict = {}
    _flatten_script_module(module, "", state, set())
    return {key: value.clone() for key, value in state.items()}


def is_torchscript_archive(path: str) -> bool:
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        return any(n.endswith("/constants.pkl") for n in archive.namelist())


def read_official_checkpoint(path: str):
    """Whatever the official loader would read from ``path`` (a checkpoint dict, or for a
    TorchScript archive its state dict). Plain files go through ``torch.load(weights_only=True)``."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if is_torchscript_archive(path):
        return read_torchscript_state_dict(path)
    return read_checkpoint_file(path, "cpu")
