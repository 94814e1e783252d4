"""Training backends: the small interface the step is written against.

The step calls, per model name ("sit", "vae", "disc"): ``backward(name, loss)``,
``clip_grad_norm(name, max_norm)``, ``step(name)``, ``zero_grad(name)``, plus
``autocast()`` for forward passes and ``sync_step`` (True on the micro-step that updates).
Single process lives here; DDP and DeepSpeed implement the same methods.
"""

import contextlib
from typing import Dict, Optional

import torch
import torch.nn as nn

PRECISIONS = ("fp32", "bf16", "fp16")


class SingleProcessBackend:
    """One process, one device. fp16 uses ONE GradScaler shared by every optimizer, updated
    after each optimizer step, as the official accelerate setup does (spec §2.4, Q15)."""

    def __init__(
        self,
        models: Dict[str, nn.Module],
        optimizers: Dict[str, torch.optim.Optimizer],
        precision: str = "fp32",
        gradient_accumulation_steps: int = 1,
        device: Optional[torch.device] = None,
    ):
        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
        if gradient_accumulation_steps < 1:
            raise ValueError(f"gradient_accumulation_steps must be >= 1, got {gradient_accumulation_steps}")
        missing = set(optimizers) - set(models)
        if missing:
            raise ValueError(f"optimizers without a model: {sorted(missing)}")
        self.models = models
        self.optimizers = optimizers
        self.precision = precision
        self.gradient_accumulation_steps = gradient_accumulation_steps
        self.device = device or next(iter(models.values())).parameters().__next__().device
        self.scaler = torch.amp.GradScaler(self.device.type) if precision == "fp16" else None
        self.micro_step = 0

    # -- the interface used by the step ---------------------------------------------------
    @property
    def sync_step(self) -> bool:
        """True when the current micro-step ends an accumulation window."""
        return (self.micro_step + 1) % self.gradient_accumulation_steps == 0

    def autocast(self):
        if self.precision == "fp32":
            return contextlib.nullcontext()
        dtype = torch.bfloat16 if self.precision == "bf16" else torch.float16
        return torch.autocast(device_type=self.device.type, dtype=dtype)

    def backward(self, name: str, loss: torch.Tensor) -> None:
        loss = loss / self.gradient_accumulation_steps
        if self.scaler is not None:
            loss = self.scaler.scale(loss)
        loss.backward()

    def clip_grad_norm(self, name: str, max_norm: float) -> torch.Tensor:
        """Unscale (fp16) then clip; returns the total norm BEFORE clipping (R5)."""
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizers[name])
        params = [p for p in self.models[name].parameters() if p.grad is not None]
        return torch.nn.utils.clip_grad_norm_(params, max_norm)

    def step(self, name: str) -> None:
        if self.scaler is not None:
            self.scaler.step(self.optimizers[name])
            self.scaler.update()
        else:
            self.optimizers[name].step()

    def zero_grad(self, name: str) -> None:
        self.optimizers[name].zero_grad(set_to_none=True)

    def end_micro_step(self) -> None:
        self.micro_step += 1

    def unwrap(self, name: str) -> nn.Module:
        return self.models[name]

    # -- state ----------------------------------------------------------------------------
    def state_dict(self) -> dict:
        state = {"optimizers": {k: o.state_dict() for k, o in self.optimizers.items()}, "micro_step": self.micro_step}
        if self.scaler is not None:
            state["scaler"] = self.scaler.state_dict()
        return state

    def load_state_dict(self, state: dict) -> None:
        for key, optimizer in self.optimizers.items():
            optimizer.load_state_dict(state["optimizers"][key])
        self.micro_step = state.get("micro_step", 0)
        if self.scaler is not None and "scaler" in state:
            self.scaler.load_state_dict(state["scaler"])


def build_adamw(module: nn.Module, lr: float = 1e-4, betas=(0.9, 0.999), eps: float = 1e-8,
                weight_decay: float = 0.0, fused: Optional[bool] = None) -> torch.optim.AdamW:
    """AdamW over ALL parameters of ``module`` in ``parameters()`` order (the official layout;
    parameters that never get a gradient get no state and no update, R8)."""
    kwargs = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay)
    if fused:
        kwargs["fused"] = True
    return torch.optim.AdamW(module.parameters(), **kwargs)
