"""The official ``train_ldm_only.py`` entry point: ``repa_e_fast/train.py`` with
``--train-mode ldm`` (a SiT on cached latents, frozen VAE), so the official command line runs
unchanged:

    python -m repa_e_fast.train_ldm_only --data-dir data --vae-latents-name e2e-vavae ...
    deepspeed repa_e_fast/train_ldm_only.py ...   |   torchrun ... repa_e_fast/train_ldm_only.py ...
"""

import os
import sys

if __package__ in (None, ""):
    # Run as a script (deepspeed/torchrun launch a file): import the package, not siblings.
    _here = os.path.dirname(os.path.abspath(__file__))
    sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != _here]
    sys.path.insert(0, os.path.dirname(_here))

from repa_e_fast.train import main as train_main  # noqa: E402


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    return train_main(["--train-mode", "ldm", *argv])  # a later --train-mode on the line still wins


if __name__ == "__main__":
    sys.exit(main())
