"""Fetch the published weights into ``pretrained/``, on demand only.

    python -m repa_e_fast.weights list                    # what is present, what is missing
    python -m repa_e_fast.weights fetch dinov2-vit-b lpips inception e2e-sdvae

Nothing else in the project downloads: training, evaluation and the loaders read local
files and fail with a clear message when one is missing. Files land under ``--dir``
(default ``pretrained/``) with the names the loaders expect. A transfer goes to
``<file>.part`` and is resumed with an HTTP Range request (also after a crash: run the same
command again); the file is renamed into place only after its checks pass.

Checksums: only the ones published by the files' authors are recorded, never one computed
here (this registry was written without network access). DINOv2, torchvision's VGG16 and
pytorch-fid's Inception follow torch.hub's convention of putting the first hex digits of
the SHA-256 in the file name (DINOv2's names carry none); taming-transformers publishes
the MD5 of the LPIPS ``vgg.pth``. The Hugging Face ``REPA-E/*`` files have no published
checksum here: ``list`` says so, and they are only checked to be complete.
"""

import argparse
import dataclasses
import hashlib
import http.client
import os
import sys
import time
import urllib.error
import urllib.request

from repa_e_fast.errors import RepaEFastError

EXIT_BAD = 2
CHUNK = 1 << 20


@dataclasses.dataclass(frozen=True)
class WeightFile:
    url: str
    path: str  # relative to the pretrained directory
    sha256_prefix: str = ""  # leading hex digits of the SHA-256, as published
    md5: str = ""
    sha256: str = ""

    def checks(self):
        known = [f"sha256 {self.sha256}" if self.sha256 else "",
                 f"sha256 prefix {self.sha256_prefix}" if self.sha256_prefix else "",
                 f"md5 {self.md5}" if self.md5 else ""]
        return ", ".join(k for k in known if k) or "no published checksum"


def _dinov2(arch, registers):
    name = f"dinov2_{arch}14" + ("_reg4" if registers else "")
    return [WeightFile(f"https://dl.fbaipublicfiles.com/dinov2/dinov2_{arch}14/{name}_pretrain.pth",
                       f"{name}_pretrain.pth")]


def _hugging_face(repo, *files, subdir=None):
    subdir = repo if subdir is None else subdir
    return [WeightFile(f"https://huggingface.co/REPA-E/{repo}/resolve/main/{f}", f"{subdir}/{f}") for f in files]


REGISTRY = {}
for _arch, _size in (("vits", "s"), ("vitb", "b"), ("vitl", "l"), ("vitg", "g")):
    REGISTRY[f"dinov2-vit-{_size}"] = _dinov2(_arch, registers=False)
    REGISTRY[f"dinov2reg-vit-{_size}"] = _dinov2(_arch, registers=True)
REGISTRY["lpips"] = [
    WeightFile("https://download.pytorch.org/models/vgg16-397923af.pth", "vgg16-397923af.pth",
               sha256_prefix="397923af"),
    WeightFile("https://heibox.uni-heidelberg.de/f/607503859c864bc1b30b/?dl=1", "vgg.pth",
               md5="d507d7349b931f0638a25a48a722f98a"),
]
REGISTRY["inception"] = [WeightFile(
    "https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/pt_inception-2015-12-05-6726825d.pth",
    "pt_inception-2015-12-05-6726825d.pth", sha256_prefix="6726825d")]
for _vae, _stem in (("sdvae", "sdvae-f8d4"), ("invae", "invae-f16d32"), ("vavae", "vavae-f16d32")):
    # The initial VAEs of REPA-E training, and the end-to-end tuned ones.
    REGISTRY[_vae] = _hugging_face(_vae, f"{_stem}.pt", f"{_stem}-latents-stats.pt",
                                   f"{_stem}-discriminator-ckpt.pt")
    REGISTRY[f"e2e-{_vae}"] = _hugging_face(f"e2e-{_vae}", f"e2e-{_vae}-400k.pt",
                                            f"e2e-{_vae}-400k-latents-stats.pt")
    # Experiment directories (generate.py --exp-path pretrained/sit-repae-<vae> --train-steps 400000).
    REGISTRY[f"sit-repae-{_vae}"] = _hugging_face(f"sit-repae-{_vae}", "args.json", "checkpoints/0400000.pt")


class FetchError(RepaEFastError):
    """A clear, one-line reason a fetch failed."""


def _hashes(path):
    sha256, md5 = hashlib.sha256(), hashlib.md5()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(CHUNK), b""):
            sha256.update(block)
            md5.update(block)
    return sha256.hexdigest(), md5.hexdigest()


def verify(file, path):
    """Raise FetchError if ``path`` does not match ``file``'s published checksums."""
    sha256, md5 = _hashes(path)
    for what, expected, actual in (("sha256", file.sha256, sha256), ("md5", file.md5, md5)):
        if expected and actual != expected:
            raise FetchError(f"{file.path}: {what} mismatch (expected {expected}, got {actual})")
    if file.sha256_prefix and not sha256.startswith(file.sha256_prefix):
        raise FetchError(f"{file.path}: sha256 mismatch (expected a hash starting {file.sha256_prefix}, got {sha256})")


class _Progress:
    def __init__(self, label, done, total, stream):
        self.label, self.done, self.total, self.stream = label, done, total, stream
        self.last = 0.0

    def update(self, n, final=False):
        self.done += n
        now = time.monotonic()
        if not final and now - self.last < 0.2:
            return
        self.last = now
        mb = self.done / 1e6
        if self.total:
            fraction = self.done / self.total
            bar = "#" * int(30 * fraction)
            text = f"{self.label} [{bar:<30}] {mb:8.1f}/{self.total / 1e6:.1f} MB"
        else:
            text = f"{self.label} {mb:8.1f} MB"
        self.stream.write("\r" + text + ("\n" if final else ""))
        self.stream.flush()


def _transfer(file, part, stream, timeout):
    """One request: append to ``part`` from its current size. Returns True when complete."""
    have = os.path.getsize(part) if os.path.exists(part) else 0
    request = urllib.request.Request(file.url, headers={"Range": f"bytes={have}-"} if have else {})
    try:
        response = urllib.request.urlopen(request, timeout=timeout)
    except urllib.error.HTTPError as e:
        if e.code == 416 and have:  # the range starts at the end: nothing left to get
            return True
        raise FetchError(f"{file.path}: HTTP {e.code} {e.reason} from {file.url}") from None
    except (urllib.error.URLError, OSError) as e:
        raise FetchError(f"{file.path}: cannot reach {file.url} ({getattr(e, 'reason', e)})") from None
    with response:
        if have and response.status != 206:  # the server ignored the range: start again
            have = 0
        length = response.headers.get("Content-Length")
        total = have + int(length) if length is not None else None
        progress = _Progress(file.path, have, total, stream)
        with open(part, "ab" if have else "wb") as out:
            try:
                for block in iter(lambda: response.read(CHUNK), b""):
                    out.write(block)
                    progress.update(len(block))
            except (OSError, ValueError, http.client.HTTPException):
                pass  # the connection dropped: what arrived is kept for the next attempt
        progress.update(0, final=True)
    return total is None or os.path.getsize(part) >= total


def fetch_file(file, directory, stream=None, attempts=3, timeout=60):
    """Download ``file`` into ``directory`` unless it is already there. Returns its path."""
    stream = stream or sys.stderr
    dest = os.path.join(directory, file.path)
    if os.path.exists(dest):
        return dest
    os.makedirs(os.path.dirname(dest) or ".", exist_ok=True)
    part = dest + ".part"
    for _ in range(attempts):
        if _transfer(file, part, stream, timeout):
            break
    else:
        size = os.path.getsize(part) if os.path.exists(part) else 0
        raise FetchError(f"{file.path}: transfer interrupted {attempts} times ({size} bytes kept in {part}); "
                         "run the same command again to resume")
    try:
        verify(file, part)
    except FetchError:
        os.remove(part)  # wrong bytes: resuming from them would never succeed
        raise
    os.replace(part, dest)
    return dest


def list_weights(directory, stream=None):
    stream = stream or sys.stdout
    for name, files in REGISTRY.items():
        for file in files:
            path = os.path.join(directory, file.path)
            state = "present" if os.path.exists(path) else (
                "partial" if os.path.exists(path + ".part") else "missing")
            stream.write(f"{name:<22} {state:<8} {path}  ({file.checks()})\n")


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m repa_e_fast.weights", description=__doc__.split("\n\n")[0])
    parser.add_argument("--dir", default="pretrained", help="where the files go (default: pretrained/)")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("list", help="show which files are present and which are missing")
    fetch = sub.add_parser("fetch", help="download NAME... (see `list` for the names)")
    fetch.add_argument("names", nargs="+", metavar="NAME")
    args = parser.parse_args(argv)

    if args.command == "list":
        list_weights(args.dir)
        return 0
    unknown = [n for n in args.names if n not in REGISTRY]
    if unknown:
        print(f"error: unknown weights {', '.join(unknown)}; known: {', '.join(REGISTRY)}", file=sys.stderr)
        return EXIT_BAD
    try:
        for name in args.names:
            for file in REGISTRY[name]:
                path = fetch_file(file, args.dir)
                print(f"{name}: {path} ({file.checks()})")
    except FetchError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_BAD
    return 0


if __name__ == "__main__":
    sys.exit(main())
