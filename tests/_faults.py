"""Test-only fault injection from the outside: the trainer and the step have no fault hook.

``LossFault(loss, steps, count).install(backend)`` makes one loss of a REPA-E step ("vae_loss",
"d_loss" or "sit_loss") NaN: it wraps what the step calls, ``backend.models["vae_loss"]`` (the
VAE-loss module: "generator" mode gives vae_loss, "discriminator" mode d_loss) and, for
sit_loss, ``backend.models["sit"]`` (its denoising loss). Checkpoints read the unwrapped
modules (``backend.unwrap``), so they are unchanged. With ``steps`` the fault fires at most
``count`` times at each of these global steps (the loss module receives the step number);
without, at every step while ``loss`` is set.

As a launcher, the real command line with the fault given as JSON before the trainer's flags::

    python tests/_faults.py '{"loss": "sit_loss", "steps": [2], "count": 100}' --config ...
"""

import json
import os
import sys
from typing import Dict, Optional, Sequence

import torch.nn as nn

LOSSES = ("vae_loss", "d_loss", "sit_loss")


class LossFault:
    def __init__(self, loss: Optional[str], steps: Optional[Sequence[int]] = None, count: int = 1):
        if loss is not None and loss not in LOSSES:
            raise ValueError(f"loss must be one of {LOSSES}, got {loss!r}")
        self.loss = loss
        self.steps = None if steps is None else set(steps)
        self.count = count
        self.injected: Dict[int, int] = {}  # global step -> faults injected there
        self.step = None  # the global step of the step being run

    def install(self, backend):
        backend.models["vae_loss"] = _PoisonedLossModule(backend.models["vae_loss"], self)
        backend.models["sit"] = _PoisonedSiT(backend.models["sit"], self)
        return backend

    def fires(self, loss: str) -> bool:
        if loss != self.loss:
            return False
        if self.steps is None:
            return True
        if self.step not in self.steps or self.injected.get(self.step, 0) >= self.count:
            return False
        self.injected[self.step] = self.injected.get(self.step, 0) + 1
        return True


class _PoisonedLossModule(nn.Module):
    def __init__(self, module: nn.Module, fault: LossFault):
        super().__init__()
        self.module = module
        self.fault = fault

    def forward(self, inputs, reconstructions, posterior, global_step, mode="generator"):
        loss, parts = self.module(inputs, reconstructions, posterior, global_step, mode)
        if mode == "generator":  # the first call of every REPA-E step
            self.fault.step = global_step
        if self.fault.fires("vae_loss" if mode == "generator" else "d_loss"):
            loss = loss * float("nan")
        return loss, parts


class _PoisonedSiT(nn.Module):
    def __init__(self, module: nn.Module, fault: LossFault):
        super().__init__()
        self.module = module
        self.fault = fault

    def forward(self, *args, **kwargs):
        out = self.module(*args, **kwargs)
        if not kwargs.get("align_only") and self.fault.fires("sit_loss"):  # not the VAE's align pass
            out = {**out, "denoising_loss": out["denoising_loss"] * float("nan")}
        return out


def main(argv: Sequence[str]) -> int:
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from repa_e_fast import train

    spec = json.loads(argv[0])
    fault = LossFault(spec["loss"], spec.get("steps"), spec.get("count", 1))
    build_backend = train.build_backend
    train.build_backend = lambda *args, **kwargs: fault.install(build_backend(*args, **kwargs))
    return train.main(list(argv[1:]))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
