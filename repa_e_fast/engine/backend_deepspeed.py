"""DeepSpeed backend: the step's backend interface (``backends.py``) on DeepSpeed engines.

One engine each for the SiT ("sit"), the VAE ("vae") and the VAE-loss module that owns the
discriminator ("vae_loss"), DeepSpeed's documented pattern for a generator/discriminator pair.
ZeRO stages 0, 1 and 2; stage 3 is refused (see ``_STAGE3_REASON``).

Precision. The weights, gradients and Adam states stay fp32 (the official policy,
docs/numerics.md#precision-and-the-shared-loss-scale): bf16/fp16 run the forwards under
``torch.autocast`` through DeepSpeed's ``torch_autocast`` section, never DeepSpeed's native
"bf16"/"fp16" modes, which cast the weights to half precision and would feed fp32 images to a
half discriminator inside the fp32 loss module. fp16 uses ONE dynamic loss scale shared by the
three engines, as the official run (``SharedLossScaler``), set on each ZeRO optimizer as
DeepSpeed's external loss scale; DeepSpeed alone would keep one scaler per engine (see the
constructor).

Gradient accumulation. DeepSpeed decides "is this micro-step the boundary" from a counter
it advances in ``engine.step()``. The backend therefore calls ``engine.step()`` (or, for a
dropped micro-step, advances the same counters) exactly once per engine per micro-step, so
``sync_step`` and every engine's boundary agree; ``end_micro_step`` checks it.

Faults. A non-finite loss (checked on all ranks before each backward) makes the step call
``skip``: the backend drops the gradients every engine accumulated in the window (ZeRO keeps
them in its own buffers, not only in ``param.grad``) without an update. A non-finite
gradient norm is known only inside ZeRO's ``step()``, which then skips that engine's update
(its overflow path) while the other engines apply theirs; at stage 0 ``clip_grad_norm``
returns the norm, so the step skips every model, as with DDP.
"""

import contextlib
import copy
import json
import pathlib
from typing import Dict, Optional, Union

import torch
import torch.distributed as dist
import torch.nn as nn

from ..models.checkpoints import safe_torch_load
from .backends import PRECISIONS, SharedLossScaler, autocast_for

AUTOCAST_DTYPES = {"bf16": "bfloat16", "fp16": "float16"}
_DTYPE_NAMES = {"bfloat16": "bfloat16", "bf16": "bfloat16", "torch.bfloat16": "bfloat16",
                "float16": "float16", "fp16": "float16", "half": "float16", "torch.float16": "float16"}

_STAGE3_REASON = (
    "ZeRO stage 3 is not supported by DeepSpeedBackend. Stage 3 partitions the parameters "
    "themselves (each rank keeps an empty placeholder) and gathers them in forward pre-hooks on "
    "every submodule. The REPA-E step calls the SiT's align pass, and the loss module calls its "
    "discriminator in the generator role, through torch.func.functional_call with DETACHED "
    "parameters (so that no parameter hook fires); under stage 3 those stand-ins are detached "
    "empty placeholders, and the gather hooks fail on them (tried with DeepSpeed 0.19.8: "
    "\"'Tensor' object has no attribute 'ds_status'\" in the loss module's generator call). "
    "Supporting it needs the step to gather the SiT/discriminator parameters around those frozen "
    "calls (deepspeed.zero.GatheredParameters), which gives back most of stage 3's saving for the "
    "SiT. Use stage 2: it shards gradients and optimizer states (12 of the 16 bytes per "
    "parameter of fp32 AdamW training).")


# Engine folders under a checkpoint's deepspeed/ named before a rename: checkpoints written
# before the VAE-loss module's key became "vae_loss" hold its engine under "disc".
_OLD_TAGS = {"vae_loss": "disc"}


def _safe_deepspeed_load(path, map_location=None):
    """What DeepSpeed's checkpoint engine reads, loaded without running code. Besides tensors,
    its ZeRO optimizer files pickle three plain DeepSpeed types (checked with
    ``torch.serialization.get_unsafe_globals_in_checkpoint`` on stage 1/2 checkpoints)."""
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return safe_torch_load(path, map_location, extra_globals=(ZeroStageEnum, LossScaler, fragment_address))


def load_deepspeed_config(path_or_dict: Union[str, pathlib.Path, dict], *, precision: str, micro_batch_size: int,
                          gradient_accumulation_steps: int, max_grad_norm: float, world_size: int) -> dict:
    """Read a DeepSpeed JSON template and fill the fields the trainer owns.

    "auto" (or an absent field) is filled from the trainer's settings; a value the template
    does set must agree with them, else ``ValueError`` names both. Precision is expressed in
    the ``torch_autocast`` section; DeepSpeed's native "fp16"/"bf16" weight casting, "amp",
    and "optimizer"/"scheduler" sections are refused (the backend passes its own optimizers
    with constant learning rates)."""
    if isinstance(path_or_dict, (str, pathlib.Path)):
        config = json.loads(pathlib.Path(path_or_dict).read_text())
    else:
        config = copy.deepcopy(dict(path_or_dict))
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")

    for key in ("fp16", "bf16"):
        if config.get(key, {}).get("enabled", False) not in (False, "auto"):
            raise ValueError(
                f"DeepSpeed config enables {key!r}: DeepSpeed's native {key} mode casts the weights to half "
                "precision, but the VAE-loss module runs in fp32 and the official run keeps fp32 weights. "
                f"Remove the {key!r} section; the trainer's precision fills the 'torch_autocast' section.")
        config.pop(key, None)
    for key in ("amp", "optimizer", "scheduler"):
        if key in config:
            raise ValueError(f"DeepSpeed config has an {key!r} section; DeepSpeedBackend builds its own AdamW "
                             "optimizers (optimizer_settings) with constant learning rates: remove it")

    def fill(key, value, source):
        current = config.get(key, "auto")
        if current != "auto" and (isinstance(current, bool) or not isinstance(current, (int, float))
                                  or float(current) != float(value)):
            raise ValueError(f"DeepSpeed config sets {key}={current!r} but the trainer's {source} is {value!r}")
        config[key] = value

    fill("train_micro_batch_size_per_gpu", int(micro_batch_size), "micro batch size")
    fill("gradient_accumulation_steps", int(gradient_accumulation_steps), "gradient_accumulation_steps")
    fill("gradient_clipping", float(max_grad_norm), "max_grad_norm")
    fill("train_batch_size", int(micro_batch_size) * int(gradient_accumulation_steps) * int(world_size),
         "micro batch x accumulation x world size")

    autocast = dict(config.get("torch_autocast", {}))
    enabled, dtype = autocast.get("enabled", "auto"), autocast.get("dtype", "auto")
    if precision == "fp32":
        if enabled not in (False, "auto") or dtype not in ("auto", None):
            raise ValueError(f"DeepSpeed config enables torch_autocast ({dtype}) but precision is fp32")
        config.pop("torch_autocast", None)
    else:
        wanted = AUTOCAST_DTYPES[precision]
        if enabled is False:
            raise ValueError(f"DeepSpeed config disables torch_autocast but precision is {precision}")
        if dtype != "auto" and _DTYPE_NAMES.get(str(dtype)) != wanted:
            raise ValueError(f"DeepSpeed config's torch_autocast dtype is {dtype!r} but precision is {precision} "
                             f"({wanted})")
        autocast.update(enabled=True, dtype=wanted)
        # DeepSpeed would otherwise all-reduce the gradients of Linear/Conv weights in the
        # autocast dtype; the official run reduces fp32 gradients.
        autocast.setdefault("lower_precision_safe_modules", [])
        config["torch_autocast"] = autocast

    zero = dict(config.get("zero_optimization", {}))
    stage = zero.get("stage", 0)
    if stage not in (0, 1, 2, 3):
        raise ValueError(f"zero_optimization.stage must be 0, 1, 2 or 3, got {stage!r}")
    zero["stage"] = stage
    config["zero_optimization"] = zero
    return config


@contextlib.contextmanager
def _scalars_as_vectors(module: nn.Module):
    """DeepSpeed 0.19's engine broadcasts every parameter at construction as
    ``p.data.view(torch.uint8)``, which fails for 0-dim parameters (the loss module's frozen
    ``logvar``). Give them shape [1] (a view of the same storage) while the engine is built."""
    scalars = [p for p in module.parameters() if p.dim() == 0]
    for p in scalars:
        p.data = p.data.reshape(1)
    try:
        yield
    finally:
        for p in scalars:
            p.data = p.data.reshape(())


def _prologue_in_own_backward_only(engine) -> None:
    """An engine's forward hooks its outputs so that a backward through them runs the
    engine's backward prologue (and, under ZeRO, queues its gradient reduction for the end
    of that backward). The loss module's engine is also called in the generator role, with a
    frozen discriminator, and that output feeds the VAE loss: DeepSpeed 0.19.8 then runs the
    discriminator engine's prologue and reduction inside the VAE's backward, and fails
    (tried: ZeRO-1/2 "IndexError: list index out of range" in reduce_ipg_grads, on buckets
    that no gradient of that engine ever filled; stage 0 "Direct calls to tensor.backward()
    are not supported"). Gate the prologue to the engine's own ``engine.backward``."""
    prologue = engine._backward_prologue

    def gated():
        if engine._running_engine_backward:
            prologue()

    engine._backward_prologue = gated


def build_optimizer(module: nn.Module, lr: float = 1e-4, betas=(0.9, 0.999), eps: float = 1e-8,
                    weight_decay: float = 0.0):
    """AdamW over ALL of ``module``'s parameters in ``parameters()`` order (the official
    layout). DeepSpeed's FusedAdam (AdamW mode) when the accelerator is CUDA and its op
    loads (prebuilt or JIT-compiled with nvcc), torch AdamW otherwise. Returns
    (optimizer, kind), kind "deepspeed.FusedAdam" or "torch.AdamW"."""
    from deepspeed.accelerator import get_accelerator

    kwargs = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay)
    if get_accelerator().device_name() == "cuda":
        try:
            from deepspeed.ops.op_builder import FusedAdamBuilder
            FusedAdamBuilder().load()  # raises when it can neither find nor build the op
            from deepspeed.ops.adam import FusedAdam
            return FusedAdam(module.parameters(), adam_w_mode=True, **kwargs), "deepspeed.FusedAdam"
        except Exception:  # no nvcc / mismatched toolkit: torch's AdamW computes the same update
            pass
    return torch.optim.AdamW(module.parameters(), **kwargs), "torch.AdamW"


class DeepSpeedBackend:
    """See the module docstring. ``models[name]`` are the engines (forward = the module's
    forward), ``unwrap(name)`` the modules. The caller makes ``sit.pos_embed`` trainable and
    converts BatchNorms to global BN before constructing the backend (DeepSpeed collects the
    trainable parameters at construction)."""

    def __init__(self, models: Dict[str, nn.Module], optimizer_settings: Dict[str, dict], ds_config,
                 precision: str = "fp32", gradient_accumulation_steps: int = 1, micro_batch_size: int = 1,
                 max_grad_norm: float = 1.0, device=None):
        import deepspeed
        from deepspeed.accelerator import get_accelerator

        if not dist.is_initialized():
            raise RuntimeError("DeepSpeedBackend needs torch.distributed initialised (launch with deepspeed/torchrun)")
        deepspeed.init_distributed(dist_backend=dist.get_backend())  # adopts the existing process group
        missing = set(models) - set(optimizer_settings)
        if missing:
            raise ValueError(f"models without optimizer settings: {sorted(missing)}")
        self.world_size = dist.get_world_size()
        self.config = load_deepspeed_config(ds_config, precision=precision, micro_batch_size=micro_batch_size,
                                            gradient_accumulation_steps=gradient_accumulation_steps,
                                            max_grad_norm=max_grad_norm, world_size=self.world_size)
        self.zero_stage = self.config["zero_optimization"]["stage"]
        if self.zero_stage == 3:
            raise NotImplementedError(_STAGE3_REASON)
        if precision == "fp16" and self.zero_stage == 0:
            raise ValueError("fp16 needs ZeRO stage 1 or 2 with DeepSpeedBackend (the shared loss scale is set on "
                             "the ZeRO optimizers); for unsharded fp16 training use DDPBackend")
        self.precision = precision
        self.gradient_accumulation_steps = gradient_accumulation_steps
        self.max_grad_norm = float(max_grad_norm)
        self.device = torch.device(device if device is not None else get_accelerator().current_device_name())
        self.scaler = SharedLossScaler() if precision == "fp16" else None

        self.modules: Dict[str, nn.Module] = {}
        self.models: Dict[str, nn.Module] = {}
        self._trainable: Dict[str, list] = {}  # requires_grad flags the engines were built with
        self.optimizer_kinds: Dict[str, str] = {}
        for name, module in models.items():
            optimizer, kind = build_optimizer(module, **optimizer_settings[name])
            with _scalars_as_vectors(module):
                engine, *_ = deepspeed.initialize(model=module, optimizer=optimizer, config=copy.deepcopy(self.config))
            if self.scaler is not None:
                # With torch_autocast fp16, DeepSpeed gives each ZeRO optimizer its own torch
                # GradScaler, and in 0.19.8 that is wrong twice (tried): ZeRO clips and reports
                # the norm of the still-scaled gradients (2^16 times too large), and an
                # overflow returns before GradScaler.update(), so the scale never backs off and
                # that model never updates again. Use DeepSpeed's external loss scale
                # (override_loss_scale), which ZeRO divides out before clipping, with ONE
                # scale shared by the three engines, as the official run.
                engine.optimizer.torch_autocast_gradscaler = None
                engine.optimizer.override_loss_scale(self.scaler.get_scale())
            _prologue_in_own_backward_only(engine)
            self.models[name] = engine
            self.modules[name] = engine.module
            self.optimizer_kinds[name] = kind
            self._trainable[name] = [p.requires_grad for p in module.parameters()]
        self.micro_step = 0
        self._done = set()   # engines stepped or dropped in this micro-step
        self._fault = False  # skip() was called in this micro-step
        self._check_boundaries()

    # -- the interface used by the step ---------------------------------------------------
    @property
    def sync_step(self) -> bool:
        return (self.micro_step + 1) % self.gradient_accumulation_steps == 0

    @property
    def checks_grad_norm(self) -> bool:
        return self.scaler is None

    def autocast(self):
        return autocast_for(self.precision, self.device)

    def backward(self, name: str, loss: torch.Tensor) -> None:
        engine = self.models[name]
        if self._trainable.get(name) is not None:  # once per engine
            self._check_trainable(name)
        if self.scaler is not None:
            engine.optimizer.override_loss_scale(self.scaler.get_scale())
        engine.backward(loss)  # divides by the accumulation steps itself

    def clip_grad_norm(self, name: str, max_norm: float) -> Optional[torch.Tensor]:
        if float(max_norm) != self.max_grad_norm:
            raise ValueError(f"DeepSpeed clips with gradient_clipping={self.max_grad_norm}, the step asks {max_norm}")
        if self.zero_stage > 0:
            return None  # ZeRO computes the norm over its shards inside step()
        # Stage 0: the boundary backward has averaged the full gradients already; DeepSpeed
        # clips them inside step() with the same threshold. Returning the norm here lets the
        # step skip every model on a non-finite one (stage 0 would otherwise step with it).
        grads = [p.grad for p in self.modules[name].parameters() if p.grad is not None]
        return torch.nn.utils.get_total_norm(grads) if grads else torch.zeros((), device=self.device)

    def step(self, name: str, overflow: bool = False) -> None:
        # ``overflow`` is not needed: ZeRO finds an fp16 overflow itself inside step().
        engine = self.models[name]
        engine.step()
        self._done.add(name)
        if self.scaler is not None:
            # An overflow (non-finite norm of the scaled gradients) made ZeRO skip this update.
            self.scaler.update(found_inf=not engine.was_step_applied())

    def skip(self, name: str) -> None:
        self._drop(name)
        self._fault = True

    def grad_norm_after_step(self, name: str) -> Optional[torch.Tensor]:
        if self.zero_stage == 0:
            return None  # returned by clip_grad_norm
        norm = self.models[name].get_global_grad_norm()
        return None if norm is None else torch.as_tensor(norm, dtype=torch.float32)

    def any_rank(self, flags: torch.Tensor) -> torch.Tensor:
        flags = flags.to(self.device, copy=True)
        dist.all_reduce(flags, op=dist.ReduceOp.MAX)
        return flags

    def end_micro_step(self) -> None:
        for name, engine in self.models.items():
            if name in self._done:
                continue
            if self._fault:
                # A fault drops the accumulation window of EVERY engine, also those that did
                # no backward in this micro-step, so no engine later steps with part of it.
                self._drop(name)
            elif self.sync_step:
                raise RuntimeError(f"engine {name!r} got neither step() nor skip() on a synchronising micro-step")
            else:
                engine.step()  # off the boundary: no update, DeepSpeed only counts the micro-step
        self._done.clear()
        self._fault = False
        self.micro_step += 1
        self._check_boundaries()

    def unwrap(self, name: str) -> nn.Module:
        return self.modules[name]

    # -- dropping gradients -----------------------------------------------------------------
    def _drop(self, name: str) -> None:
        """Drop the engine's accumulated gradients without an update and count the micro-step
        as ``engine.step()`` would. ZeRO-1/2 keep gradients outside ``param.grad`` (the
        reduced partition in ``averaged_gradients``, the accumulation in ``all_grad_tensors``):
        this clears what ``DeepSpeedZeroOptimizer.step`` clears when it skips an overflowed
        step."""
        engine = self.models[name]
        optimizer = engine.optimizer
        if self.zero_stage in (1, 2):
            optimizer.zero_grad(set_to_none=True)
            optimizer._release_preflattened_grad_buffers()
            for group in list(optimizer.averaged_gradients):
                optimizer.averaged_gradients[group] = None
            for group in list(optimizer.all_grad_tensors):
                optimizer.all_grad_tensors[group] = None
            optimizer.micro_step_id = -1  # INITIAL_MICRO_STEP_ID, as after a step
        else:
            engine.zero_grad()
        # The counters engine.step() advances (its overflow path: a skipped step still counts).
        boundary = engine.is_gradient_accumulation_boundary()
        engine.micro_steps += 1
        if boundary:
            engine.global_steps += 1
            engine.global_samples += engine.train_batch_size()
            engine.skipped_steps += 1
        self._done.add(name)

    def _check_trainable(self, name: str) -> None:
        """ZeRO builds its gradient partitions from the parameters that required grad when the
        engine was built; one made trainable later (REPAEStep unfreezes the SiT's pos_embed)
        would get gradients that no optimizer ever applies."""
        now = [p.requires_grad for p in self.modules[name].parameters()]
        if now != self._trainable[name]:
            changed = [n for (n, p), was in zip(self.modules[name].named_parameters(), self._trainable[name])
                       if p.requires_grad != was]
            raise RuntimeError(f"{name}: requires_grad changed after the DeepSpeed engine was built for {changed}; "
                               "set it before constructing DeepSpeedBackend (e.g. sit.pos_embed.requires_grad_(True))")
        self._trainable[name] = None

    def _check_boundaries(self) -> None:
        for name, engine in self.models.items():
            if engine.is_gradient_accumulation_boundary() != self.sync_step:
                raise RuntimeError(f"engine {name!r} boundary disagrees with the backend's micro-step "
                                   f"{self.micro_step} (accumulation {self.gradient_accumulation_steps})")

    # -- state ----------------------------------------------------------------------------
    def save_checkpoint(self, directory: pathlib.Path) -> None:
        """Collective. Each engine writes its module, its (sharded) optimizer state and its
        counters under ``directory/<name>/``; rank 0 adds ``backend.pt`` (micro-step, fp16
        scale). Returns after every rank has written everything."""
        directory = pathlib.Path(directory)
        for name, engine in self.models.items():
            engine.save_checkpoint(str(directory), tag=name, save_latest=False)
        if dist.get_rank() == 0:
            state = {"micro_step": self.micro_step, "precision": self.precision, "zero_stage": self.zero_stage,
                     "world_size": self.world_size}
            if self.scaler is not None:
                state["scaler"] = self.scaler.state_dict()
            torch.save(state, directory / "backend.pt")
        dist.barrier()

    def load_checkpoint(self, directory: pathlib.Path) -> None:
        """Collective; the inverse of ``save_checkpoint`` (same ZeRO stage and world size)."""
        directory = pathlib.Path(directory)
        state = safe_torch_load(directory / "backend.pt")
        if (state["zero_stage"], state["world_size"]) != (self.zero_stage, self.world_size):
            raise ValueError(f"checkpoint was written with ZeRO stage {state['zero_stage']} on {state['world_size']} "
                             f"ranks; this backend runs stage {self.zero_stage} on {self.world_size}")
        for name, engine in self.models.items():
            # DeepSpeed's own reader unpickles with weights_only=False: route every file it
            # reads through the allow-listed loader, so no checkpoint file can run code.
            engine.checkpoint_engine.load = _safe_deepspeed_load
            tag = name if (directory / name).is_dir() else _OLD_TAGS.get(name, name)
            path, _ = engine.load_checkpoint(str(directory), tag=tag, load_module_strict=True,
                                             load_optimizer_states=True, load_lr_scheduler_states=False)
            if path is None:
                raise FileNotFoundError(f"no DeepSpeed checkpoint for {name!r} under {directory}")
        self.micro_step = state["micro_step"]
        for engine in self.models.values():
            # DeepSpeed restores global_steps/skipped_steps/global_samples but not the
            # micro-step counter its accumulation boundary is computed from.
            engine.micro_steps = self.micro_step
        if self.scaler is not None:
            self.scaler.load_state_dict(state["scaler"])
        self._check_boundaries()

    def optimizer_state_dicts(self) -> Dict[str, dict]:
        """Collective. Consolidated torch ``AdamW.state_dict()``s, one per model, in the
        official layout (all parameters in ``parameters()`` order, torch's param group
        fields; no state before the first update), for the official single-file export.
        Returned on every rank. Stage 0 keeps the whole optimizer on every rank; ZeRO-1/2
        keep each parameter's ``exp_avg``/``exp_avg_sq`` as fragments of per-rank flat fp32
        partitions: each rank writes its fragments into a zero tensor and a sum all-reduce
        assembles the parameter (one all-reduce per parameter and state: fine for an export,
        not for every step). Read from the optimizer state itself rather than DeepSpeed's
        ``safe_get_full_optimizer_state``, whose fragment views are linked only at the next
        ``step()`` and so fail (or go stale) right after ``load_checkpoint``."""
        result = {}
        for name, engine in self.models.items():
            params = list(self.modules[name].parameters())
            base = engine.optimizer if self.zero_stage == 0 else engine.optimizer.optimizer
            group = base.param_groups[0]
            exported = torch.optim.AdamW(params, lr=group["lr"], betas=group["betas"], eps=group["eps"],
                                         weight_decay=group["weight_decay"]).state_dict()
            for index, param in enumerate(params):
                if self.zero_stage == 0:
                    state = base.state.get(param)
                    if state:
                        exported["state"][index] = {key: state[key].detach().clone().cpu()
                                                    for key in ("exp_avg", "exp_avg_sq")}
                        exported["state"][index]["step"] = self._step_tensor(state, group)
                elif param.requires_grad and self._has_zero_state(engine):
                    exported["state"][index] = {key: self._gather_zero_state(engine, param, key).cpu()
                                                for key in ("exp_avg", "exp_avg_sq")}
                    flat_states = [s for s in base.state.values() if s]
                    exported["state"][index]["step"] = self._step_tensor(flat_states[0], group)
            result[name] = exported
        return result

    def load_optimizer_state_dicts(self, states: Dict[str, dict]) -> None:
        """The inverse of ``optimizer_state_dicts``: torch ``AdamW.state_dict()``s in the
        official layout (state indexed by ``parameters()`` order) -> each engine's optimizer.
        Stage 0: per-parameter states; ZeRO-1/2: each rank copies its fragment of every
        parameter into its flat fp32 partition's ``exp_avg``/``exp_avg_sq``. Only the moments
        and the step are taken: the learning rates and betas stay the run's own."""
        for name, full in states.items():
            engine = self.models[name]
            params = list(self.modules[name].parameters())
            loaded = {int(index): state for index, state in full.get("state", {}).items() if state}
            if not loaded:
                continue  # saved before the first update: nothing to restore
            if max(loaded) >= len(params):
                raise ValueError(f"{name}: the optimizer state has parameter index {max(loaded)} but the model has "
                                 f"{len(params)} parameters")
            step = float(next(iter(loaded.values()))["step"])
            base = engine.optimizer if self.zero_stage == 0 else engine.optimizer.optimizer
            for index, state in loaded.items():
                param = params[index]
                for key in ("exp_avg", "exp_avg_sq"):
                    if state[key].shape != param.shape:
                        raise ValueError(f"{name}: {key} of parameter {index} has shape {tuple(state[key].shape)}, "
                                         f"the parameter {tuple(param.shape)}")
                if self.zero_stage == 0:
                    base.state[param] = {key: state[key].to(param.device, torch.float32).clone()
                                         for key in ("exp_avg", "exp_avg_sq")}
                    self._set_step(base, base.state[param], step)
                    continue
                mapping = getattr(param, "_hp_mapping", None)  # None: no element of param on this rank
                if mapping is None or not param.requires_grad:
                    continue
                flat = engine.optimizer.single_partition_of_fp32_groups[mapping.param_group_index]
                flat_state = base.state[flat]
                if not flat_state:
                    flat_state.update(exp_avg=torch.zeros_like(flat), exp_avg_sq=torch.zeros_like(flat))
                self._set_step(base, flat_state, step)
                hp, lp = mapping.hp_fragment_address, mapping.lp_fragment_address
                for key in ("exp_avg", "exp_avg_sq"):
                    fragment = state[key].reshape(-1).narrow(0, lp.start, lp.numel)
                    flat_state[key].narrow(0, hp.start, hp.numel).copy_(fragment)

    def set_learning_rates(self, lrs: Dict[str, float]) -> None:
        for name, engine in self.models.items():
            # A ZeRO optimizer exposes its base optimizer's param groups.
            for group in engine.optimizer.param_groups:
                group["lr"] = lrs[name]

    @staticmethod
    def _set_step(optimizer, state: dict, step: float) -> None:
        if isinstance(optimizer, torch.optim.Optimizer) and not hasattr(optimizer, "adam_w_mode"):
            state["step"] = torch.tensor(step, dtype=torch.float32)  # torch AdamW: per state
        else:  # DeepSpeed's FusedAdam: an int per state, and per group for older checkpoints
            state["step"] = int(step)
            for group in optimizer.param_groups:
                group["step"] = int(step)

    @staticmethod
    def _step_tensor(state: dict, group: dict) -> torch.Tensor:
        step = state["step"] if "step" in state else group["step"]  # torch keeps it per state, FusedAdam per group
        return torch.as_tensor(step, dtype=torch.float32).detach().clone().cpu()

    @staticmethod
    def _has_zero_state(engine) -> bool:
        return any(bool(s) for s in engine.optimizer.optimizer.state.values())

    def _gather_zero_state(self, engine, param: nn.Parameter, key: str) -> torch.Tensor:
        full = torch.zeros(param.numel(), dtype=torch.float32, device=self.device)
        mapping = getattr(param, "_hp_mapping", None)  # None: no element of param on this rank
        if mapping is not None:
            flat = engine.optimizer.single_partition_of_fp32_groups[mapping.param_group_index]
            source = engine.optimizer.optimizer.state[flat][key]
            hp, lp = mapping.hp_fragment_address, mapping.lp_fragment_address
            full.narrow(0, lp.start, lp.numel).copy_(source.narrow(0, hp.start, hp.numel))
        dist.all_reduce(full)  # every element lives on exactly one rank
        return full.view_as(param)
