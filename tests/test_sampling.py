"""Samplers (docs/sampling.md): fixture parity, closed-form ODE solutions, the SDE's draws
and final mean step, guidance (interval, null label, batch layout) and argument errors."""

import copy
import math
import os

import pytest
import torch

from _paths import fixture
from repa_e_fast.parity import Comparator
from repa_e_fast.parity_samplers import check_samplers
from repa_e_fast.sampling import denormalize_latents, euler_maruyama_sampler, euler_sampler

SAMPLERS_FIXTURE = fixture("samplers.pt")


# ----------------------------------------------------------------------------------------
# An analytic "model": v(x, t, y) = x - c[y] (per-class constant c), so dx/dt = x - c has
# the solution x(t) - c = (x(1) - c) * exp(t - 1) and every scheme has a closed form.
# ----------------------------------------------------------------------------------------
class AffineVelocity(torch.nn.Module):
    def __init__(self, offsets=(0.5, -1.0, 2.0, 0.25)):
        super().__init__()
        self.num_classes = len(offsets) - 1  # the last offset is the null label's
        self.register_buffer("offsets", torch.tensor(offsets, dtype=torch.float64))
        self.calls = []

    def inference(self, x, t, y):
        self.calls.append({"n": x.shape[0], "t": t.clone(), "y": y.clone(), "dtype": x.dtype, "t_dtype": t.dtype})
        return x - self.offsets[y].to(x.dtype).view(-1, 1, 1, 1)


class ConstantOffsetVelocity(torch.nn.Module):
    """v = x - c for a fixed tensor c (ignores the labels)."""

    def __init__(self, c):
        super().__init__()
        self.c = c

    def inference(self, x, t, y):
        return x - self.c.to(x.dtype)


def analytic(**kwargs):
    return AffineVelocity(**kwargs).eval()


def noise(n=2, dtype=torch.float64, seed=0):
    return torch.randn(n, 3, 4, 4, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def offsets_like(model, y, x):
    return model.offsets[y].view(-1, 1, 1, 1).expand_as(x)


# ----------------------------------------------------------------------------------------
# Fixture parity (docs/sampling.md#parity)
# ----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def samplers_data():
    if not os.path.exists(SAMPLERS_FIXTURE):
        pytest.skip(f"reference fixture {SAMPLERS_FIXTURE} not present")
    return torch.load(SAMPLERS_FIXTURE, weights_only=True)


def run_checker(data):
    comparator = Comparator("samplers")
    with torch.random.fork_rng(devices=[]):
        check_samplers(data, comparator)
    return comparator.results


def test_fixture_parity(samplers_data):
    results = run_checker(samplers_data)
    failed = [r.line() for r in results if not r.passed]
    assert not failed, "\n".join(failed)
    runs = samplers_data["outputs"]["runs"]
    assert len(results) == 6 * len(runs)  # output, noise draws, call x / t / y / out per run
    # every recorded call and draw was compared (the per-run lines name their counts)
    for tag, run in runs.items():
        notes = {r.name.split(f"runs/{tag}/", 1)[1]: r.note for r in results if f"runs/{tag}/" in r.name}
        assert notes["inference_calls/out"].startswith(f"{len(run['inference_calls'])} entries")
        if run["noise_draws"]:
            assert notes["noise_draws"].startswith(f"{len(run['noise_draws'])} entries")


def _perturb_output(run):
    run["output"] = run["output"] + 1e-2


def _perturb_draw(run):
    run["noise_draws"][3] = run["noise_draws"][3] + 1e-12  # draws are compared exactly


def _perturb_call_out(run):
    run["inference_calls"][2]["out"] = run["inference_calls"][2]["out"] * 1.01


def _perturb_call_y(run):
    run["inference_calls"][-1]["y"] = run["inference_calls"][-1]["y"].flip(0)


def _drop_call(run):
    run["inference_calls"] = run["inference_calls"][:-1]


def _drop_draw(run):
    run["noise_draws"] = run["noise_draws"][:-1]


def _unknown_kwarg(run):
    run["kwargs"] = {**run["kwargs"], "sampler_eps": 0.01}


@pytest.mark.parametrize("perturb", [_perturb_output, _perturb_draw, _perturb_call_out, _perturb_call_y,
                                     _drop_call, _drop_draw, _unknown_kwarg])
def test_perturbed_fixture_fails(samplers_data, perturb):
    data = copy.deepcopy(samplers_data)
    tag = "euler_maruyama_linear_cfg4.0"
    data["outputs"]["runs"] = {tag: data["outputs"]["runs"][tag]}
    perturb(data["outputs"]["runs"][tag])
    assert not all(r.passed for r in run_checker(data))


def test_perturbed_weights_fail(samplers_data):
    data = copy.deepcopy(samplers_data)
    data["outputs"]["runs"] = {"euler_plain_cfg1.0": data["outputs"]["runs"]["euler_plain_cfg1.0"]}
    data["state_dict"]["final_layer.linear.bias"] += 0.01
    assert not all(r.passed for r in run_checker(data))


# ----------------------------------------------------------------------------------------
# ODE: closed forms
# ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("num_steps", [1, 3, 8])
def test_euler_closed_form(num_steps):
    model, x1, y = analytic(), noise(), torch.tensor([0, 2])
    c = offsets_like(model, y, x1)
    h = -1.0 / num_steps
    out = euler_sampler(model, x1, y, num_steps=num_steps)
    torch.testing.assert_close(out, c + (x1 - c) * (1 + h) ** num_steps, rtol=1e-12, atol=1e-12)
    assert len(model.calls) == num_steps


@pytest.mark.parametrize("num_steps", [1, 2, 5])
def test_heun_closed_form_last_step_is_euler(num_steps):
    model, x1, y = analytic(), noise(), torch.tensor([1, 0])
    c = offsets_like(model, y, x1)
    h = -1.0 / num_steps
    out = euler_sampler(model, x1, y, num_steps=num_steps, heun=True)
    factor = (1 + h + h * h / 2) ** (num_steps - 1) * (1 + h)  # Heun steps, then one Euler step
    torch.testing.assert_close(out, c + (x1 - c) * factor, rtol=1e-12, atol=1e-12)
    assert len(model.calls) == 2 * num_steps - 1


def test_ode_converges_to_exact_solution():
    model, x1, y = analytic(), noise(), torch.tensor([2, 1])
    exact = offsets_like(model, y, x1) + (x1 - offsets_like(model, y, x1)) * math.exp(-1)
    err_euler = (euler_sampler(model, x1, y, num_steps=200) - exact).abs().max().item()
    err_heun = (euler_sampler(model, x1, y, num_steps=200, heun=True) - exact).abs().max().item()
    assert err_euler < 5e-3 and err_heun < err_euler / 10


def test_model_called_in_latents_dtype_and_state_is_float64():
    model, y = analytic(), torch.tensor([0, 1])
    out = euler_sampler(model, noise(dtype=torch.float32), y, num_steps=4, heun=True)
    assert out.dtype == torch.float64
    assert {c["dtype"] for c in model.calls} == {torch.float32}
    assert {c["t_dtype"] for c in model.calls} == {torch.float32}
    model.calls.clear()
    out = euler_maruyama_sampler(model, noise(dtype=torch.float32), y, num_steps=4)
    assert out.dtype == torch.float64 and {c["dtype"] for c in model.calls} == {torch.float32}


# ----------------------------------------------------------------------------------------
# Guidance
# ----------------------------------------------------------------------------------------
def test_guided_ode_closed_form_cond_half_first():
    # v_guided = x - (c_null + s (c_y - c_null)): the ODE with an effective offset.
    model, x1, y, s = analytic(), noise(), torch.tensor([0, 2]), 3.0
    c_null = model.offsets[model.num_classes]
    c_eff = c_null + s * (offsets_like(model, y, x1) - c_null)
    out = euler_sampler(model, x1, y, num_steps=4, cfg_scale=s)
    torch.testing.assert_close(out, c_eff + (x1 - c_eff) * 0.75**4, rtol=1e-12, atol=1e-12)
    for call in model.calls:  # [x; x] with labels [y; null]
        assert call["n"] == 4 and call["y"].tolist() == y.tolist() + [model.num_classes] * 2


def test_guidance_interval_is_inclusive_and_heun_corrector_uses_t_cur():
    model, y = analytic(), torch.tensor([0, 1])
    euler_sampler(model, noise(), y, num_steps=4, cfg_scale=2.0, guidance_low=0.25, guidance_high=0.75)
    # grid 1, .75, .5, .25: both ends of [0.25, 0.75] are guided, t = 1 is not
    assert [(c["n"], c["t"][0].item()) for c in model.calls] == [(2, 1.0), (4, 0.75), (4, 0.5), (4, 0.25)]

    model.calls.clear()
    euler_sampler(model, noise(), y, num_steps=4, heun=True, cfg_scale=2.0, guidance_low=0.0, guidance_high=0.5)
    # step 1 (t_cur .75, unguided): its corrector at t = .5 stays unguided though .5 is in the interval
    assert [(c["n"], c["t"][0].item()) for c in model.calls] == [
        (2, 1.0), (2, 0.75), (2, 0.75), (2, 0.5), (4, 0.5), (4, 0.25), (4, 0.25)]


def test_null_label_defaults_to_num_classes_and_can_be_overridden():
    model, y = analytic(offsets=(0.1, 0.2, 0.3, 0.4, 0.5, 0.6)), torch.tensor([1, 4])
    euler_maruyama_sampler(model, noise(), y, num_steps=3, cfg_scale=1.5)
    assert all(c["y"].tolist() == [1, 4, 5, 5] for c in model.calls)
    model.calls.clear()
    euler_sampler(model, noise(), y, num_steps=2, cfg_scale=1.5, null_label=0)
    assert all(c["y"].tolist() == [1, 4, 0, 0] for c in model.calls)


@pytest.mark.parametrize("sampler", [euler_sampler, euler_maruyama_sampler])
def test_cfg_scale_one_is_no_guidance(sampler):
    model, x1, y = analytic(), noise(), torch.tensor([2, 0])
    torch.manual_seed(3)
    plain = sampler(model, x1, y, num_steps=5)
    calls = len(model.calls)
    torch.manual_seed(3)
    scale_one = sampler(model, x1, y, num_steps=5, cfg_scale=1.0, guidance_low=0.0, guidance_high=1.0)
    assert torch.equal(plain, scale_one)
    assert all(c["n"] == 2 for c in model.calls) and len(model.calls) == 2 * calls


# ----------------------------------------------------------------------------------------
# SDE
# ----------------------------------------------------------------------------------------
def reference_sde(x, y, model, num_steps, path_type, noises):
    """The SDE with the drift written out per path (docs/sampling.md#euler-maruyama-sde-sampler):
    linear ``(2 - t) v + x``; cosine: var = 1, score = -(2/pi) cot(pi t / 2) v - x,
    drift = v - t * score."""
    times = torch.linspace(1, 0.04, num_steps, dtype=torch.float64).tolist() + [0.0]
    for i in range(num_steps):
        t, dt = times[i], times[i + 1] - times[i]
        v = x - offsets_like(model, y, x)
        if path_type == "linear":
            drift = (2 - t) * v + x
        else:
            drift = v - t * (-(2 / math.pi) / math.tan(math.pi * t / 2) * v - x)
        x = x + dt * drift
        if i < num_steps - 1:
            x = x + math.sqrt(2 * t) * math.sqrt(abs(dt)) * noises[i]
    return x


@pytest.mark.parametrize("path_type", ["linear", "cosine"])
def test_sde_matches_written_out_drift_and_ends_with_the_mean(path_type, monkeypatch):
    model, x1, y, num_steps = analytic(), noise(), torch.tensor([1, 2]), 6
    draws, randn_like = [], torch.randn_like

    def recording(*args, **kwargs):
        draws.append(randn_like(*args, **kwargs))
        return draws[-1]

    monkeypatch.setattr(torch, "randn_like", recording)
    torch.manual_seed(11)
    out = euler_maruyama_sampler(model, x1, y, num_steps=num_steps, path_type=path_type)
    assert len(draws) == num_steps - 1  # no noise on the last interval (0.04 -> 0)
    assert all(d.dtype == torch.float64 and d.shape == x1.shape for d in draws)
    assert len(model.calls) == num_steps
    assert model.calls[-1]["t"][0].item() == pytest.approx(0.04)
    torch.testing.assert_close(out, reference_sde(x1, y, model, num_steps, path_type, draws), rtol=1e-10, atol=1e-10)


def test_sde_is_deterministic_given_the_seed_and_single_step_is_noise_free():
    model, x1, y = analytic(), noise(), torch.tensor([0, 1])
    torch.manual_seed(5)
    a = euler_maruyama_sampler(model, x1, y, num_steps=5)
    torch.manual_seed(5)
    b = euler_maruyama_sampler(model, x1, y, num_steps=5)
    torch.manual_seed(6)
    c = euler_maruyama_sampler(model, x1, y, num_steps=5)
    assert torch.equal(a, b) and not torch.equal(a, c)
    # num_steps = 1: one deterministic step from t = 1 (linear: drift = v + x) to 0
    state = torch.random.get_rng_state()
    out = euler_maruyama_sampler(model, x1, y, num_steps=1)
    assert torch.equal(state, torch.random.get_rng_state())
    torch.testing.assert_close(out, offsets_like(model, y, x1) - x1, rtol=1e-12, atol=1e-12)


def test_sde_guidance_on_drift_equals_guided_velocity_for_linear_path():
    # The linear drift is affine in v with the same x coefficient: guiding it = guiding v.
    model, x1, y, s = analytic(), noise(), torch.tensor([0, 2]), 2.5
    torch.manual_seed(2)
    guided = euler_maruyama_sampler(model, x1, y, num_steps=4, cfg_scale=s)
    c_null = model.offsets[model.num_classes]
    effective = ConstantOffsetVelocity(c_null + s * (offsets_like(model, y, x1) - c_null)).eval()
    torch.manual_seed(2)
    unguided = euler_maruyama_sampler(effective, x1, y, num_steps=4)
    torch.testing.assert_close(guided, unguided, rtol=1e-12, atol=1e-12)
    assert all(c["n"] == 4 for c in model.calls)


# ----------------------------------------------------------------------------------------
# Errors (raised before any network call)
# ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("sampler", [euler_sampler, euler_maruyama_sampler])
@pytest.mark.parametrize("kwargs, error", [
    ({"num_steps": 0}, "num_steps"),
    ({"num_steps": 2.0}, "num_steps"),
    ({"num_steps": True}, "num_steps"),
    ({"cfg_scale": 0.5}, "cfg_scale"),
    ({"cfg_scale": float("nan")}, "cfg_scale"),
    ({"guidance_low": 0.6, "guidance_high": 0.4}, "guidance interval"),
    ({"guidance_low": -0.1}, "guidance interval"),
    ({"guidance_high": 65.0}, "guidance interval"),
    ({"path_type": "cosin"}, "path_type"),
])
def test_bad_arguments(sampler, kwargs, error):
    model = analytic()
    with pytest.raises(ValueError, match=error):
        sampler(model, noise(), torch.tensor([0, 1]), **kwargs)
    assert model.calls == []


@pytest.mark.parametrize("sampler", [euler_sampler, euler_maruyama_sampler])
def test_training_mode_and_bad_inputs_are_rejected(sampler):
    model = AffineVelocity()  # nn.Module starts in training mode
    with pytest.raises(RuntimeError, match="eval"):
        sampler(model, noise(), torch.tensor([0, 1]))
    model.eval()
    with pytest.raises(ValueError, match="y must be"):
        sampler(model, noise(), torch.tensor([0, 1, 2]))
    with pytest.raises(ValueError, match="y must be"):
        sampler(model, noise(), torch.tensor([0.0, 1.0]))
    with pytest.raises(TypeError, match="latents"):
        sampler(model, noise().long(), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="null_label"):
        sampler(model, noise(), torch.tensor([0, 1]), cfg_scale=2.0, null_label=1.5)
    assert model.calls == []


def test_guidance_without_a_null_row_is_rejected():
    from repa_e_fast.models.sit import SiT

    sit = SiT(input_size=8, patch_size=2, in_channels=4, hidden_size=32, depth=2, num_heads=2, z_dims=[16],
              encoder_depth=1, projector_dim=16, num_classes=10, class_dropout_prob=0.0).eval()
    latents, y = torch.randn(2, 4, 8, 8), torch.tensor([0, 9])
    with pytest.raises(ValueError, match="null label 10"):
        euler_sampler(sit, latents, y, num_steps=2, cfg_scale=1.5)
    assert euler_sampler(sit, latents, y, num_steps=2).shape == latents.shape  # unguided is fine


def test_denormalize_latents_inverts_the_latent_batchnorm():
    z = torch.randn(2, 4, 3, 3, generator=torch.Generator().manual_seed(1))
    mean, var = torch.tensor([0.1, -0.2, 0.3, 0.0]).view(1, 4, 1, 1), torch.tensor([0.5, 2.0, 1.0, 4.0]).view(1, 4, 1, 1)
    scale = var.rsqrt()
    torch.testing.assert_close(denormalize_latents((z - mean) * scale, scale, mean), z)
    assert torch.equal(denormalize_latents(torch.ones(1, 4, 1, 1), scale, mean), 1 / scale + mean)
