"""Training backends: the small interface the step is written against.

Per model name ("sit", "vae", "vae_loss") the step calls:

  backward(name, loss)              scale (fp16) and accumulate gradients
  clip_grad_norm(name, max_norm)    on a synchronising micro-step: unscale, clip, return the
                                    norm BEFORE clipping as a device tensor (all ranks agree;
                                    no host read); None when the backend only learns the norm
                                    inside ``step`` (DeepSpeed ZeRO)
  step(name, overflow) / skip(name) apply / drop the accumulated gradients (sync steps);
                                    ``overflow``: fp16, that model's norm was non-finite
  grad_norm_after_step(name)        the norm a backend computed inside ``step``, else None

plus ``autocast()``, ``sync_step``, ``end_micro_step()``, ``any_rank(flags)`` (the
element-wise maximum of a float flag vector over ranks, on the device, so all ranks skip
together) and ``unwrap(name)``; the checkpoint code calls ``optimizer_state_dicts()``,
``load_optimizer_state_dicts(states)`` and ``set_learning_rates(lrs)``. ``TrainingBackend``
states this interface. Single process and DDP live here, DeepSpeed in
``backend_deepspeed.py``.
"""

import contextlib
from typing import ContextManager, Dict, Optional, Protocol

import torch
import torch.distributed as dist
import torch.nn as nn

PRECISIONS = ("fp32", "bf16", "fp16")


class TrainingBackend(Protocol):
    """What the step and the checkpoint code need from a backend (see the module docstring).
    ``models[name]`` is what the step calls (possibly a DDP module or a DeepSpeed engine),
    ``unwrap(name)`` the plain module."""

    models: Dict[str, nn.Module]

    @property
    def sync_step(self) -> bool: ...

    @property
    def checks_grad_norm(self) -> bool: ...

    def autocast(self) -> ContextManager: ...

    def backward(self, name: str, loss: torch.Tensor) -> None: ...

    def clip_grad_norm(self, name: str, max_norm: float) -> Optional[torch.Tensor]: ...

    def step(self, name: str, overflow: bool = False) -> None: ...

    def skip(self, name: str) -> None: ...

    def grad_norm_after_step(self, name: str) -> Optional[torch.Tensor]: ...

    def any_rank(self, flags: torch.Tensor) -> torch.Tensor: ...

    def end_micro_step(self) -> None: ...

    def unwrap(self, name: str) -> nn.Module: ...

    def optimizer_state_dicts(self) -> Dict[str, dict]:
        """Per model, a torch ``AdamW.state_dict()`` in the official layout (collective under
        ZeRO, returned on every rank)."""

    def load_optimizer_state_dicts(self, states: Dict[str, dict]) -> None: ...

    def set_learning_rates(self, lrs: Dict[str, float]) -> None:
        """Put ``lrs[name]`` into every param group of that model's optimizer."""


def autocast_for(precision: str, device: torch.device):
    """Forward-pass autocast of a precision mode: none for fp32, bf16/fp16 autocast otherwise
    (weights, gradients and optimizer states stay fp32 in every mode)."""
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


class SharedLossScaler:
    """Dynamic fp16 loss scale shared by the three optimizers, with the official run's
    arithmetic (docs/numerics.md#precision-and-the-shared-loss-scale): start 2^16, x0.5 on an
    overflow, x2 after 2000 clean updates, one update after EACH optimizer's step (three per
    iteration), an overflow skips only that optimizer. The step applies all updates after all
    backward passes, so every backward of one iteration uses the same scale; the scale sequence
    is the official one."""

    def __init__(self, init_scale: float = 2.0**16, growth_factor: float = 2.0, backoff_factor: float = 0.5,
                 growth_interval: int = 2000):
        self.scale = float(init_scale)
        self.growth_factor = growth_factor
        self.backoff_factor = backoff_factor
        self.growth_interval = growth_interval
        self.clean_updates = 0

    def update(self, found_inf: bool) -> None:
        if found_inf:
            self.scale *= self.backoff_factor
            self.clean_updates = 0
            return
        self.clean_updates += 1
        if self.clean_updates == self.growth_interval:
            self.scale *= self.growth_factor
            self.clean_updates = 0

    def get_scale(self) -> float:
        return self.scale

    def state_dict(self) -> dict:
        return {"scale": self.scale, "clean_updates": self.clean_updates}

    def load_state_dict(self, state: dict) -> None:
        self.scale = float(state["scale"])
        self.clean_updates = int(state["clean_updates"])


class SingleProcessBackend:
    """One process, one device."""

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
        self.models = dict(models)
        self.modules = dict(models)  # unwrapped; subclasses wrap self.models
        self.optimizers = optimizers
        self.precision = precision
        self.gradient_accumulation_steps = gradient_accumulation_steps
        self.device = device or next(iter(models.values())).parameters().__next__().device
        self.scaler = SharedLossScaler() if precision == "fp16" else None
        self.micro_step = 0

    # -- the interface used by the step ---------------------------------------------------
    @property
    def sync_step(self) -> bool:
        """True when the current micro-step ends an accumulation window."""
        return (self.micro_step + 1) % self.gradient_accumulation_steps == 0

    @property
    def checks_grad_norm(self) -> bool:
        """A non-finite gradient norm is a fault, except under fp16, where it is an
        overflow that the loss scaler handles by skipping that optimizer's step."""
        return self.scaler is None

    def autocast(self):
        return autocast_for(self.precision, self.device)

    def backward(self, name: str, loss: torch.Tensor) -> None:
        loss = loss / self.gradient_accumulation_steps
        if self.scaler is not None:
            loss = loss * self.scaler.get_scale()
        loss.backward()

    def _grads(self, name: str):
        return [p.grad for p in self.modules[name].parameters() if p.grad is not None]

    def _reduce_gradients(self, name: str) -> None:
        """Hook for data-parallel backends: average gradients over ranks."""

    def clip_grad_norm(self, name: str, max_norm: float) -> torch.Tensor:
        self._reduce_gradients(name)
        grads = self._grads(name)
        if self.scaler is not None:
            torch._foreach_mul_(grads, 1.0 / self.scaler.get_scale())
        params = [p for p in self.modules[name].parameters() if p.grad is not None]
        # No host read. On CPU and CUDA torch's default is the multi-tensor path (one norm
        # kernel and one scale per dtype, not two launches per parameter; the per-tensor loop
        # only on devices without foreach kernels, e.g. meta for FLOP counting). A non-finite
        # norm scales by NaN; the step then skips (or, fp16, drops) these gradients.
        return torch.nn.utils.clip_grad_norm_(params, max_norm)

    def step(self, name: str, overflow: bool = False) -> None:
        if self.scaler is not None:
            if not overflow:
                self.optimizers[name].step()
            self.scaler.update(overflow)
        else:
            self.optimizers[name].step()
        self.optimizers[name].zero_grad(set_to_none=True)

    def skip(self, name: str) -> None:
        self.optimizers[name].zero_grad(set_to_none=True)

    def grad_norm_after_step(self, name: str) -> Optional[torch.Tensor]:
        return None

    def any_rank(self, flags: torch.Tensor) -> torch.Tensor:
        return flags

    def end_micro_step(self) -> None:
        self.micro_step += 1

    def unwrap(self, name: str) -> nn.Module:
        return self.modules[name]

    # -- state ----------------------------------------------------------------------------
    def optimizer_state_dicts(self) -> Dict[str, dict]:
        return {k: o.state_dict() for k, o in self.optimizers.items()}

    def load_optimizer_state_dicts(self, states: Dict[str, dict]) -> None:
        for key, optimizer in self.optimizers.items():
            optimizer.load_state_dict(states[key])

    def set_learning_rates(self, lrs: Dict[str, float]) -> None:
        for name, optimizer in self.optimizers.items():
            for group in optimizer.param_groups:
                group["lr"] = lrs[name]

    def state_dict(self) -> dict:
        """The backend's own counters (micro-step, fp16 loss scale); the optimizers are saved
        through ``optimizer_state_dicts``."""
        state = {"micro_step": self.micro_step}
        if self.scaler is not None:
            state["scaler"] = self.scaler.state_dict()
        return state

    def load_state_dict(self, state: dict) -> None:
        self.micro_step = state.get("micro_step", 0)
        if self.scaler is not None and "scaler" in state:
            self.scaler.load_state_dict(state["scaler"])


class DDPBackend(SingleProcessBackend):
    """torch.distributed data parallel (torchrun). The SiT and the VAE are wrapped in
    DistributedDataParallel (their gradients are all-reduced during backward, overlapped
    with compute). The VAE-loss module is not wrapped: it is called twice per step in two
    roles (generator loss with a frozen discriminator, then the discriminator loss), which
    DDP's one-forward-one-backward reducer cannot follow; its few trainable parameters (the
    discriminator, ~2.8 M) are averaged with one flat all-reduce before clipping."""

    WRAPPED = ("sit", "vae")

    def __init__(self, models, optimizers, precision="fp32", gradient_accumulation_steps=1, device=None,
                 process_group=None):
        super().__init__(models, optimizers, precision, gradient_accumulation_steps, device)
        if not dist.is_initialized():
            raise RuntimeError("DDPBackend needs torch.distributed initialised (launch with torchrun)")
        self.process_group = process_group
        self.world_size = dist.get_world_size(process_group)
        device_ids = [self.device.index] if self.device.type == "cuda" else None
        for name in self.WRAPPED:
            if name in self.models:
                # broadcast_buffers=False: the latent BN is synchronised by SyncBatchNorm, and
                # rank 0's buffers must not overwrite the others' mid-step.
                self.models[name] = nn.parallel.DistributedDataParallel(
                    self.modules[name], device_ids=device_ids, broadcast_buffers=False, process_group=process_group)
        # Ranks are seeded differently. DDP copied rank 0's SiT and VAE above; the loss
        # module (discriminator, logvar, LPIPS) is copied here, or every rank would train its
        # own discriminator from its own initialisation (and a resume, which loads rank 0's
        # into all ranks, would not continue the same run).
        source = dist.get_global_rank(process_group, 0) if process_group is not None else 0
        for name, module in self.models.items():
            if name not in self.WRAPPED:
                for tensor in [*module.parameters(), *module.buffers()]:
                    dist.broadcast(tensor.data, src=source, group=process_group)
        self._set_gradient_sync()

    def _set_gradient_sync(self) -> None:
        # Only the micro-step that ends an accumulation window all-reduces (DDP reads this
        # flag at forward time, as its no_sync() context does).
        for name in self.WRAPPED:
            if name in self.models:
                self.models[name].require_backward_grad_sync = self.sync_step

    def _reduce_gradients(self, name: str) -> None:
        if name in self.WRAPPED or self.world_size == 1:
            return
        grads = self._grads(name)
        if not grads:
            return
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat, group=self.process_group)
        flat /= self.world_size
        offset = 0
        for g in grads:
            g.copy_(flat[offset:offset + g.numel()].view_as(g))
            offset += g.numel()

    def any_rank(self, flags: torch.Tensor) -> torch.Tensor:
        flags = flags.clone()
        dist.all_reduce(flags, op=dist.ReduceOp.MAX, group=self.process_group)
        return flags

    def end_micro_step(self) -> None:
        super().end_micro_step()
        self._set_gradient_sync()


def build_adamw(module: nn.Module, lr: float = 1e-4, betas=(0.9, 0.999), eps: float = 1e-8,
                weight_decay: float = 0.0, fused: Optional[bool] = None) -> torch.optim.AdamW:
    """AdamW over ALL parameters of ``module`` in ``parameters()`` order (the official layout;
    parameters that never get a gradient get no state and no update, docs/numerics.md#optimizers)."""
    kwargs = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay)
    if fused:
        kwargs["fused"] = True
    return torch.optim.AdamW(module.parameters(), **kwargs)

