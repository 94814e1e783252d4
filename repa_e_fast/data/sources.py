"""Where images come from: a raw folder, the official images.h5, or our prepared shards.

A source is a list of ``num_images`` encoded images (JPEG/PNG/... bytes) with int64
labels, in a fixed "file order". It only reads bytes; decoding and cropping happen in
the loaders. Sources are pickled into DataLoader worker processes, so they hold no open
file handles across a fork (each process opens what it reads itself).

Layouts
-------
* folder: ``<root>/<class_dir>/**/<image>`` (``root`` or ``root/train``). Files are
  listed recursively and sorted by relative path, as the official preprocessing does
  (docs/data.md#sources). Labels: from ``<root>/dataset.json`` (``{"labels": [[relpath, class],
  ...]}``) when present, else the index of the top-level folder in the sorted list of
  top-level folders that contain at least one image. Empty folders get no class number
  (the official code numbers only top-level names that occur in its file list) and are
  reported with a warning; loose files in ``root`` itself are ignored with a warning.
* h5: the official ``images.h5`` + ``images_h5.json`` (docs/data.md#sources); PNG bytes per
  key, labels from the ``dataset.json`` dataset inside the file. Needs ``h5py``.
* prepared: the output of ``python -m repa_e_fast.data.prepare`` (see prepare.py):
  ``meta.json``, ``index.npy`` and tar shards.
"""

from __future__ import annotations

import io
import json
import logging
import os
import stat
from typing import List, Optional

import numpy as np
from PIL import Image

from ..errors import RepaEFastError

logger = logging.getLogger("repa_e_fast.data")

__all__ = [
    "DatasetError",
    "FolderSource",
    "H5Source",
    "PreparedSource",
    "open_source",
    "image_extensions",
    "scan_image_folder",
    "PREPARED_FORMAT",
]

PREPARED_FORMAT = "repa_e_fast.prepared_images"


class DatasetError(RepaEFastError, ValueError):
    """A dataset path that cannot be used (missing, empty, incomplete, wrong resolution)."""


def image_extensions() -> frozenset:
    """Lower-case file extensions PIL can open (``.jpeg``, ``.png``, ...)."""
    return frozenset(ext.lower() for ext in Image.registered_extensions())


# --------------------------------------------------------------------------- folder


def read_regular_file(path: str) -> bytes:
    """The bytes of ``path``; ``OSError`` unless it is a regular file. Opened non-blocking, so
    a FIFO named ``x.jpg`` does not wait for a writer, and a device is never read from."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    with os.fdopen(fd, "rb") as f:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise OSError(f"{path} is not a regular file")
        return f.read()


def _resolve_folder_root(path: str) -> str:
    if os.path.isfile(os.path.join(path, "dataset.json")):
        return path
    train = os.path.join(path, "train")
    return train if os.path.isdir(train) else path


def _walk_each_directory_once(root: str):
    """``(directory, file names)`` for every directory under ``root``, symlinked ones
    included, each real directory (device, inode) once. The real tree is listed first, so
    a link to a directory inside it adds nothing, and a link back to an ancestor (a loop)
    cannot list the same images again and again under new names and labels."""
    seen = set()
    tops = [root]  # the real tree, then each symlinked directory found, in walk order
    for top in tops:
        for directory, subdirs, files in os.walk(top):  # does not descend into links
            status = os.stat(directory)
            if (status.st_dev, status.st_ino) in seen:
                subdirs.clear()
                continue
            seen.add((status.st_dev, status.st_ino))
            subdirs.sort()
            tops.extend(os.path.join(directory, name) for name in subdirs
                        if os.path.islink(os.path.join(directory, name)))
            yield directory, files


def scan_image_folder(root: str) -> tuple[list, np.ndarray, list, list]:
    """List the images of a folder dataset.

    Returns ``(relpaths, labels, class_names, empty_class_dirs)``: relative paths (with
    ``/``) sorted, int64 labels, the class names in class-index order (empty when the
    labels come from ``dataset.json``) and the top-level folders with no image.
    """
    extensions = image_extensions()
    relpaths = []
    for directory, files in _walk_each_directory_once(root):
        for name in files:
            if os.path.splitext(name)[1].lower() in extensions:
                rel = os.path.relpath(os.path.join(directory, name), root)
                relpaths.append(rel.replace(os.sep, "/"))
    relpaths.sort()

    label_file = os.path.join(root, "dataset.json")
    if os.path.isfile(label_file):
        with open(label_file, encoding="utf-8") as f:
            entries = json.load(f).get("labels")
        if not isinstance(entries, list):
            raise DatasetError(f"dataset '{root}': dataset.json has no 'labels' list")
        label_of = {str(rel).replace("\\", "/"): int(cls) for rel, cls in entries}
        unlabeled = [rel for rel in relpaths if rel not in label_of]
        if unlabeled:
            logger.warning(
                "dataset '%s': %d image(s) not listed in dataset.json are ignored (first: %s)",
                root, len(unlabeled), unlabeled[0],
            )
        missing = len(label_of) - (len(relpaths) - len(unlabeled))
        if missing:
            logger.warning("dataset '%s': %d file(s) named in dataset.json do not exist", root, missing)
        relpaths = [rel for rel in relpaths if rel in label_of]
        labels = np.array([label_of[rel] for rel in relpaths], dtype=np.int64)
        return relpaths, labels, [], []

    loose = [rel for rel in relpaths if "/" not in rel]
    if loose:
        logger.warning(
            "dataset '%s': %d image(s) directly in the root are ignored (no class folder; first: %s)",
            root, len(loose), loose[0],
        )
    relpaths = [rel for rel in relpaths if "/" in rel]
    class_names = sorted({rel.split("/", 1)[0] for rel in relpaths})
    class_index = {name: i for i, name in enumerate(class_names)}
    labels = np.array([class_index[rel.split("/", 1)[0]] for rel in relpaths], dtype=np.int64)
    empty = sorted(
        entry.name for entry in os.scandir(root)
        if entry.is_dir() and entry.name not in class_index
    )
    if empty:
        logger.warning(
            "dataset '%s': %d class folder(s) contain no image and get no class number: %s",
            root, len(empty), ", ".join(empty[:10]) + (" ..." if len(empty) > 10 else ""),
        )
    return relpaths, labels, class_names, empty


class FolderSource:
    """ImageNet-style folder of encoded images; needs the ADM crop."""

    kind = "folder"
    cropped = False  # images are raw photographs, loaders apply the ADM crop

    def __init__(self, path: str):
        self.root = _resolve_folder_root(os.path.abspath(path))
        relpaths, labels, self.class_names, self.empty_class_dirs = scan_image_folder(self.root)
        if not relpaths:
            raise DatasetError(
                f"dataset path '{path}' contains no images (looked for <class>/<image> with "
                f"an image extension under '{self.root}')"
            )
        # One fixed-width bytes array instead of a list of str: compact and
        # copy-on-write friendly in forked DataLoader workers.
        self._relpaths = np.array([rel.encode("utf-8") for rel in relpaths])
        self.labels = labels
        self.num_images = len(relpaths)
        self.num_classes = len(self.class_names) if self.class_names else int(labels.max()) + 1
        self.resolution: Optional[int] = None

    def name(self, index: int) -> str:
        return os.path.join(self.root, self._relpaths[index].decode("utf-8"))

    def relpath(self, index: int) -> str:
        return self._relpaths[index].decode("utf-8")

    def read(self, index: int) -> bytes:
        return read_regular_file(self.name(index))


# --------------------------------------------------------------------------- h5


def _import_h5py():
    try:
        import h5py  # noqa: PLC0415 (optional dependency of this source only)
    except ImportError:
        raise ImportError(
            "reading the official images.h5 layout needs h5py: pip install h5py"
        ) from None
    return h5py


def _h5_bytes(value) -> bytes:
    """The bytes of one stored image, whatever NumPy type h5py hands back."""
    if isinstance(value, bytes):
        return value
    if isinstance(value, np.void):
        return value.tobytes()
    if isinstance(value, np.ndarray):
        return value.tobytes() if value.dtype == np.uint8 else bytes(value[()])
    return bytes(value)


def h5_member_names(h5, path: str) -> List[str]:
    """The names inside an official h5 file: from the ``<stem>_h5.json`` list the official
    preprocessing writes beside it (fast), else by walking the file."""
    list_file = os.path.splitext(path)[0] + "_h5.json"
    if os.path.isfile(list_file):
        with open(list_file, encoding="utf-8") as handle:
            return json.load(handle)
    names: List[str] = []
    h5.visit(names.append)
    return names


class H5Source:
    """The official preprocessed ``images.h5`` (PNG bytes at the training resolution)."""

    kind = "h5"
    cropped = True

    def __init__(self, path: str):
        h5py = _import_h5py()
        self.path = path
        extensions = image_extensions()
        with h5py.File(path, "r") as h5:
            names = h5_member_names(h5, path)
            keys = sorted(n for n in names if os.path.splitext(n)[1].lower() in extensions)
            if not keys:
                raise DatasetError(f"dataset path '{path}' contains no images")
            if "dataset.json" not in h5:
                raise DatasetError(f"dataset '{path}': no 'dataset.json' labels inside the h5 file")
            entries = json.loads(_h5_bytes(h5["dataset.json"][()]).decode("utf-8"))["labels"]
            first = _h5_bytes(h5[keys[0]][()])
        label_of = {str(key): int(cls) for key, cls in entries}
        missing = [k for k in keys if k not in label_of]
        if missing:
            raise DatasetError(f"dataset '{path}': {len(missing)} image(s) have no label, e.g. {missing[0]}")
        self._keys = np.array([k.encode("utf-8") for k in keys])
        self.labels = np.array([label_of[k] for k in keys], dtype=np.int64)
        self.num_images = len(keys)
        self.num_classes = int(self.labels.max()) + 1
        self.class_names: list = []
        self.empty_class_dirs: list = []
        try:
            with Image.open(io.BytesIO(first)) as im:
                self.resolution = im.size[0] if im.size[0] == im.size[1] else None
        except Exception:
            self.resolution = None
        self._h5 = None
        self._pid = None

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_h5"], state["_pid"] = None, None
        return state

    def name(self, index: int) -> str:
        return f"{self.path}:{self._keys[index].decode('utf-8')}"

    def read(self, index: int) -> bytes:
        # One handle per process: h5py handles must not cross a fork.
        if self._h5 is None or self._pid != os.getpid():
            self._h5 = _import_h5py().File(self.path, "r")
            self._pid = os.getpid()
        return _h5_bytes(self._h5[self._keys[index].decode("utf-8")][()])


# --------------------------------------------------------------------------- prepared


class PreparedSource:
    """Tar shards written by ``repa_e_fast.data.prepare`` (already ADM-cropped)."""

    kind = "prepared"
    cropped = True

    def __init__(self, path: str):
        self.root = path
        with open(os.path.join(path, "meta.json"), encoding="utf-8") as f:
            meta = json.load(f)
        if meta.get("format") != PREPARED_FORMAT:
            raise DatasetError(f"dataset '{path}': meta.json is not a {PREPARED_FORMAT} file")
        self.meta = meta
        # index.npy: int64 [N, 4] = (shard, byte offset, byte size, label) per image.
        index = np.load(os.path.join(path, "index.npy"))
        if index.ndim != 2 or index.shape[1] != 4 or len(index) != meta["num_images"]:
            raise DatasetError(f"dataset '{path}': index.npy does not match meta.json")
        if len(index) == 0:
            raise DatasetError(f"dataset path '{path}' contains no images")
        self._index = index
        self._shards = [os.path.join(path, name) for name in meta["shards"]]
        self.labels = np.ascontiguousarray(index[:, 3])
        self.num_images = len(index)
        self.num_classes = int(meta["num_classes"])
        self.class_names = list(meta.get("class_names", []))
        self.empty_class_dirs: list = []
        self.resolution = int(meta["resolution"])

    def name(self, index: int) -> str:
        shard, offset = int(self._index[index, 0]), int(self._index[index, 1])
        return f"{self._shards[shard]}@{offset}"

    def read(self, index: int) -> bytes:
        shard, offset, size, _ = (int(v) for v in self._index[index])
        # Open per read: no descriptors kept (thousands of shards, forked workers).
        with open(self._shards[shard], "rb") as f:
            f.seek(offset)
            data = f.read(size)
        if len(data) != size:
            raise OSError(f"shard {self._shards[shard]} is shorter than its index says")
        return data


# --------------------------------------------------------------------------- dispatch


def open_source(path, resolution: Optional[int] = None):
    """The right source for ``path``; ``DatasetError`` if it is unusable.

    ``resolution``: the training resolution; a prepared or h5 dataset stored at another
    resolution is refused (it is already cropped and would have to be resampled).
    """
    if path is None or str(path) == "":
        raise DatasetError("dataset path is empty")
    path = os.path.abspath(os.fspath(path))
    if not os.path.exists(path):
        raise DatasetError(f"dataset path '{path}' does not exist")
    if os.path.isdir(path):
        if os.path.isfile(os.path.join(path, "meta.json")):
            source = PreparedSource(path)
        elif os.path.isfile(os.path.join(path, "prepare.json")):
            raise DatasetError(
                f"dataset '{path}' is an unfinished prepare run (no meta.json): run "
                f"python -m repa_e_fast.data.prepare again with the same arguments to finish it"
            )
        elif os.path.isfile(os.path.join(path, "images.h5")):
            source = H5Source(os.path.join(path, "images.h5"))
        else:
            if not any(os.scandir(path)):
                raise DatasetError(f"dataset path '{path}' is an empty directory")
            source = FolderSource(path)
    elif path.endswith((".h5", ".hdf5")):
        source = H5Source(path)
    else:
        raise DatasetError(
            f"dataset path '{path}' is a file; expected an image folder, a prepared dataset "
            f"directory, or an .h5 file"
        )
    if resolution is not None and source.resolution is not None and source.resolution != resolution:
        raise DatasetError(
            f"dataset '{path}' holds {source.resolution}x{source.resolution} images "
            f"({source.kind}), but resolution={resolution} was asked; prepare it again at "
            f"{resolution} or point at the raw image folder"
        )
    return source
