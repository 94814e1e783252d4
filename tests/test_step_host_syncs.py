"""Lever 2 of issue 15: a training step reads the device at most once (all its fault checks
in one host read), with the documented fault semantics; lever 7: EMA and clipping as
multi-tensor operations with the reference numbers."""

import copy

import pytest
import torch

from repa_e_fast.engine.backends import SingleProcessBackend, build_adamw
from repa_e_fast.engine.ema import update_ema
from repa_e_fast.engine.host_sync import HostSyncCounter
from repa_e_fast.engine.step import LDMStep
from repa_e_fast.models.sit import SiT
from _faults import LossFault
from test_step import batch, tiny_setup


def count_syncs(backend, run):
    # The optimizers' CPU step counters are read by torch's AdamW on every device; on a GPU
    # they stay on the host, so they are no device synchronisation.
    with HostSyncCounter(optimizers=backend.optimizers.values()) as syncs:
        run()
    return syncs


def test_the_counter_sees_every_kind_of_host_read():
    x = torch.tensor([1.0, float("inf")])
    with HostSyncCounter() as syncs:
        bool(torch.isfinite(x).all())   # the old step's all_finite / grad-norm checks
        x[0].item(), float(x[0]), int(x[0]), x.tolist(), x.nonzero()
        torch.isfinite(x).logical_not().any()  # stays on the device: not counted
    assert syncs.count == 6, syncs.events
    weight = torch.nn.Parameter(torch.ones(2))
    optimizer = torch.optim.AdamW([weight])
    with HostSyncCounter(optimizers=[optimizer]) as syncs:
        weight.grad = torch.ones(2)
        optimizer.step()  # reads its CPU step counter with item(): no device sync on a GPU
    assert syncs.count == 0, syncs.events


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_repae_step_reads_the_host_once(precision):
    step, backend = tiny_setup(precision)
    images, labels, zs = batch()
    step(images, labels, 0, zs=zs)  # creates the optimizer states
    syncs = count_syncs(backend, lambda: step(images, labels, 1, zs=zs))
    # Before issue 15 this was 9: three all_finite() checks of the losses and two
    # bool(isfinite(grad_norm)) reads per model (the backend's clipping and the update).
    assert syncs.count <= 1, syncs.events
    assert step.last_fault is None


def test_faulty_and_accumulating_micro_steps_read_the_host_once():
    step, backend = tiny_setup(accumulation=2)
    images, labels, zs = batch()
    syncs = count_syncs(backend, lambda: step(images, labels, 0, zs=zs))  # off the boundary: no clipping
    assert syncs.count <= 1, syncs.events
    LossFault("d_loss").install(backend)
    syncs = count_syncs(backend, lambda: step(images, labels, 1, zs=zs))
    assert syncs.count <= 1 and step.last_fault == "d_loss", syncs.events


def test_ldm_step_reads_the_host_once():
    torch.manual_seed(0)
    sit = SiT(input_size=4, patch_size=2, in_channels=4, hidden_size=32, depth=2, num_heads=2, num_classes=5,
              z_dims=[8], projector_dim=16, encoder_depth=1)
    backend = SingleProcessBackend({"sit": sit}, {"sit": build_adamw(sit)})
    step = LDMStep(backend, copy.deepcopy(sit).requires_grad_(False))
    moments = torch.cat([torch.randn(2, 4, 4, 4), torch.rand(2, 4, 4, 4)], dim=1)
    args = (moments, torch.tensor([0, 4]))
    zs = [torch.randn(2, 4, 8)]
    step(*args, zs=zs)
    syncs = count_syncs(backend, lambda: step(*args, zs=zs))
    assert syncs.count <= 1, syncs.events
    assert {float(s["step"]) for s in backend.optimizers["sit"].state_dict()["state"].values()} == {2.0}


def test_a_nan_latent_changes_no_weight_state_or_buffer():
    """Every forward of the step runs before the one host read, so a NaN latent reaches the
    SiT's train-mode BatchNorm (pass C) and the discriminator; the fault puts the buffers back."""
    step, backend = tiny_setup()
    images, labels, zs = batch()
    step(images, labels, 0, zs=zs)
    vae = backend.unwrap("vae")
    with torch.no_grad():
        vae.quant_conv.bias[0] = float("nan")
    state = {name: copy.deepcopy(backend.unwrap(name).state_dict()) for name in ("sit", "vae", "vae_loss")}
    optimizers = {name: copy.deepcopy(o.state_dict()) for name, o in backend.optimizers.items()}
    ema = copy.deepcopy(step.ema.state_dict())
    step(images, labels, 1, zs=zs)
    assert step.last_fault is not None and "vae_loss" in step.last_fault
    for name in ("sit", "vae", "vae_loss"):
        for key, value in backend.unwrap(name).state_dict().items():
            assert torch.equal(value, state[name][key]) or (value.isnan() == state[name][key].isnan()).all(), key
        assert all(p.grad is None for p in backend.unwrap(name).parameters())
    assert torch.isfinite(backend.unwrap("sit").bn.running_mean).all()
    for name, optimizer in backend.optimizers.items():
        assert [float(s["step"]) for s in optimizer.state_dict()["state"].values()] == \
            [float(s["step"]) for s in optimizers[name]["state"].values()]
    assert all(torch.equal(v, ema[k]) for k, v in step.ema.state_dict().items())


def test_fp16_overflow_skips_that_optimizer_only_and_backs_the_scale_off():
    step, backend = tiny_setup("fp16")
    images, labels, zs = batch()
    step(images, labels, 0, zs=zs)
    scale = backend.scaler.get_scale()
    steps_before = {name: {float(s["step"]) for s in o.state_dict()["state"].values()}
                    for name, o in backend.optimizers.items()}
    vae_before = copy.deepcopy(backend.unwrap("vae").state_dict())
    sit_before = copy.deepcopy(backend.unwrap("sit").state_dict())
    hook = backend.unwrap("vae").encoder.conv_in.weight.register_hook(lambda g: g * float("inf"))
    logs = step(images, labels, 1, zs=zs)
    hook.remove()
    assert step.last_fault is None and not torch.isfinite(logs["grad_norm_vae"])
    assert all(torch.equal(v, vae_before[k]) for k, v in backend.unwrap("vae").state_dict().items()
               if "running" not in k and "num_batches" not in k)
    assert not torch.equal(backend.unwrap("sit").state_dict()["pos_embed"], sit_before["pos_embed"])
    # official order: vae (overflow: x0.5, count reset), disc, sit (two clean updates)
    assert backend.scaler.get_scale() == scale * 0.5 and backend.scaler.clean_updates == 2
    steps = {name: {float(s["step"]) for s in o.state_dict()["state"].values()}
             for name, o in backend.optimizers.items()}
    assert steps["vae"] == steps_before["vae"] and steps["vae_loss"] == {2.0} and steps["sit"] == {2.0}


# -- lever 7: EMA and clipping as multi-tensor operations --------------------------------------
def test_foreach_ema_is_bit_equal_to_the_per_tensor_loop():
    torch.manual_seed(0)
    sit = SiT(input_size=4, patch_size=2, in_channels=4, hidden_size=32, depth=2, num_heads=2, num_classes=5,
              z_dims=[8], projector_dim=16, encoder_depth=1)
    ema = copy.deepcopy(sit)
    with torch.no_grad():
        for p in list(sit.parameters()) + [sit.bn.running_mean, sit.bn.running_var]:
            p.add_(torch.randn_like(p))
        sit.bn.num_batches_tracked.fill_(5)
    reference = copy.deepcopy(ema)
    with torch.no_grad():  # the per-tensor loop the foreach version replaced
        source = dict(sit.named_parameters()) | dict(sit.named_buffers())
        for name, value in list(reference.named_parameters()) + list(reference.named_buffers()):
            if value.is_floating_point():
                value.mul_(0.9999).add_(source[name], alpha=1 - 0.9999)
            else:
                value.copy_(source[name])
    update_ema(ema, sit, 0.9999)
    for (name, value), expected in zip(ema.state_dict().items(), reference.state_dict().values()):
        assert torch.equal(value, expected), name


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_foreach_clipping_matches_the_per_tensor_clipping(precision):
    torch.manual_seed(0)
    module = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.GroupNorm(2, 8), torch.nn.Conv2d(8, 4, 1))
    backend = SingleProcessBackend({"m": module}, {"m": build_adamw(module)}, precision)
    scale = backend.scaler.get_scale() if backend.scaler is not None else 1.0
    module(torch.randn(2, 3, 9, 9)).square().sum().mul(scale).backward()
    reference = [torch.nn.Parameter(p.detach().clone()) for p in module.parameters()]
    for copy_, p in zip(reference, module.parameters()):
        copy_.grad = p.grad.clone() / scale
    expected_norm = torch.nn.utils.clip_grad_norm_(reference, 1.0, foreach=False)  # one tensor at a time
    norm = backend.clip_grad_norm("m", 1.0)
    assert expected_norm > 1.0  # the clipping scales
    assert torch.equal(norm, expected_norm)
    for copy_, p in zip(reference, module.parameters()):
        assert torch.equal(p.grad, copy_.grad)
