"""Parity of the fixture kind ``e2e_trajectory`` (docs/parity.md#the-30-step-trajectory): 30
consecutive official REPA-E steps on tiny modules, every random draw injected.

We build the modules and the three AdamW optimizers as ``e2e_step`` does (with the fixture's
ndf=8 discriminator and the LPIPS VGG16 trunk taken from the sibling ``e2e_step.pt``,
checked against the stored SHA-256), replay the 30 steps and compare as the fixture's
authors suggest (k = 0-based step, S = largest |stored value| of that quantity over
the whole trajectory):

1. exact: ``discriminator_factor`` and ``d_weight``; ``gan_loss`` = ``weighted_gan_loss`` = 0
   before ``discriminator_start``; with LeCam off ``d_loss`` = ``grad_norm_disc`` = 0 before
   the start and ``lecam_loss`` = 0 throughout; the optimizer step counts;
2. SiT-side logs: |d| <= S (5e-5 + 1e-5 k);
3. every other log and the ``per_step`` records: |d| <= S min(5e-2, 5e-4 2^(k/2)) (a
   1-ulp change drifts like this: the measured floor times 2-3);
4. the tight late-step check: restart from ``snapshots[15]`` and run steps 16-29 with
   |d| <= 1e-3 S for every logged value;
5. states: snapshot 0 as in ``e2e_step`` (parameters within 2.5 lr, docs/parity.md#tolerances),
   later snapshots within twice the largest drift the fixture's authors measured (SiT 15 lr,
   VAE 10 lr, discriminator 152 lr, EMA 0.04 lr), Adam moments within five times it (see
   MOMENT_RTOL), BN statistics with rule 3, the step counters exactly.

The LeCam rules follow the fixture's ``lecam_regularization_weight`` (the hidden variant
turns it on: then ``d_loss`` and ``lecam_loss`` are compared with rule 3 from step 0).
"""

import copy
import hashlib
import math
import os
from typing import Dict, List

import torch

from .parity import FORWARD_ATOL, FORWARD_RTOL, Comparator, Result, step_by_phase

SIT_LOGS = ("sit_loss", "denoising_loss", "grad_norm_sit")
RESTART_STEP = 15
RESTART_RTOL = 1e-3
# Largest drift at the final snapshot over 1-ulp replays, as the fixture's authors measured it:
# parameters in units of lr, twice the measured drift, as they suggest.
STATE_LR_UNITS = {"sit": 15.0, "vae": 10.0, "discriminator": 152.0, "ema": 0.04}
# Adam moments relative to each tensor's max: five times the measured drift (4e-4 SiT,
# 6e-2 VAE and discriminator). Twice is too tight for a replay that rounds differently at
# every step: at step 29 ours differ by up to 4.4x (SiT) and 2.4x (VAE, discriminator) that
# drift, while the restart from step 15 reproduces every moment to ~1e-9. The states of the
# full run are the gross-error check (moments not carried, wrong betas); the restart is
# the precise one.
MOMENT_RTOL = {"sit": 2e-3, "vae": 0.3, "loss_fn": 0.3}
FIRST_STEP_LR_UNITS = 2.5
MOMENT_GLOBAL_RTOL = 1e-5


def sit_log_tolerance(step: int) -> float:
    return 5e-5 + 1e-5 * step


def drift_tolerance(step: int) -> float:
    return min(5e-2, 5e-4 * 2 ** (step / 2))


# ----------------------------------------------------------------------------------------
# Building
# ----------------------------------------------------------------------------------------
def trunk_sha256(state: Dict[str, torch.Tensor]) -> str:
    """The fixture's recipe: keys sorted; each key's UTF-8 bytes, then its float32 little-endian bytes."""
    digest = hashlib.sha256()
    for key in sorted(state):
        digest.update(key.encode("utf-8"))
        digest.update(state[key].detach().float().contiguous().cpu().numpy().astype("<f4").tobytes())
    return digest.hexdigest()


def load_lpips_trunk(data: dict) -> Dict[str, torch.Tensor]:
    spec = data["config"]["lpips_trunk"]
    name = os.path.basename(spec["file"])
    folders = [os.path.dirname(data["source_path"])] if data.get("source_path") else []
    folders += [os.environ.get("REPA_E_FAST_FIXTURES", ""), os.path.join(os.getcwd(), "..", "shared", "reference", "fixtures")]
    path = next((os.path.join(f, name) for f in folders if f and os.path.isfile(os.path.join(f, name))), None)
    if path is None:
        raise FileNotFoundError(f"the e2e_trajectory fixture takes its LPIPS VGG16 trunk from {spec['file']}; "
                                f"put {name} beside it (looked in {[f for f in folders if f]})")
    source = torch.load(path, map_location="cpu", weights_only=True)
    entry = source
    for part in spec["entry"].split("."):
        entry = entry[part]
    trunk = {k: v for k, v in entry.items() if k.startswith(spec["prefix"])}
    if len(trunk) != spec["num_tensors"] or trunk_sha256(trunk) != spec["sha256"]:
        raise ValueError(f"{path}: its LPIPS trunk ({len(trunk)} tensors) does not match the SHA-256 that "
                         "e2e_trajectory records; the two fixtures are from different releases")
    return trunk


def build_trajectory(data: dict, trunk: Dict[str, torch.Tensor]):
    from .parity import build_e2e_step

    states = dict(data["state_dicts"])
    states["loss_module"] = {**states["loss_module"], **trunk}
    step, modules = build_e2e_step({**data, "state_dicts": states})
    sit, _ema, vae, loss_fn, _optimizers = modules
    expected = data["config"].get("optimizer_param_names", {})
    for key, module in (("sit", sit), ("vae", vae), ("loss_fn", loss_fn)):
        ours = [name for name, _ in module.named_parameters()]
        if key in expected and ours != list(expected[key]):
            raise ValueError(f"our {key} parameter order differs from the official optimizer's; "
                             "optimizer states could not be compared or restored")
    return step, modules


def load_snapshot(snapshot: dict, modules) -> None:
    sit, ema, vae, loss_fn, optimizers = modules
    sit.load_state_dict(snapshot["sit"], strict=True)
    ema.load_state_dict(snapshot["ema"], strict=True)
    vae.load_state_dict(snapshot["vae"], strict=True)
    loss_fn.discriminator.load_state_dict(snapshot["discriminator"], strict=True)
    for key, value in snapshot.get("loss_module_lecam_buffers", {}).items():
        getattr(loss_fn, key).copy_(value)
    for ours, theirs in (("sit", "sit"), ("vae", "vae"), ("vae_loss", "loss_fn")):
        optimizers[ours].load_state_dict(snapshot["optimizers"][theirs])


# ----------------------------------------------------------------------------------------
# Replay
# ----------------------------------------------------------------------------------------
def _disc_bn(loss_fn) -> Dict[str, Dict[str, torch.Tensor]]:
    buffers = dict(loss_fn.discriminator.named_buffers())
    layers = sorted({name.rsplit(".", 1)[0] for name in buffers if name.endswith("running_mean")})
    return {layer: {k: buffers[f"{layer}.{k}"].clone() for k in ("running_mean", "running_var")} for layer in layers}


def replay(data: dict, step, modules, first: int, last: int):
    """Run steps first..last; returns per-step logs (floats) and per_step records."""
    inputs, randoms = data["inputs"], data["randoms"]
    sit, ema, _vae, loss_fn, _optimizers = modules
    logs: List[Dict[str, float]] = []
    records: List[dict] = []
    for k in range(first, last + 1):
        result, inter = step_by_phase(step, inputs["raw_images"][k], inputs["labels"][k], int(inputs["global_steps"][k]),
                                      [z[k] for z in inputs["zs"]], posterior_noise=randoms["posterior_eps"][k],
                                      time_input=randoms["time_input"][k], noises=randoms["noises"][k])
        logs.append({key: float(value) for key, value in result.items()})
        records.append({
            "sit_bn_running_mean": sit.bn.running_mean.clone(), "sit_bn_running_var": sit.bn.running_var.clone(),
            "ema_bn_running_mean": ema.bn.running_mean.clone(), "ema_bn_running_var": ema.bn.running_var.clone(),
            "denoising_loss": inter["sit"]["denoising_loss"].detach().clone(),
            "vae_generator_loss": inter["vae_generator_loss"].clone(), "moments": inter["moments"].clone(),
            "disc_bn": _disc_bn(loss_fn),
            "lecam_buffers": {key: getattr(loss_fn, key).clone()
                              for key in ("ema_real_logits_mean", "ema_fake_logits_mean") if hasattr(loss_fn, key)},
        })
    return logs, records


# ----------------------------------------------------------------------------------------
# Comparisons
# ----------------------------------------------------------------------------------------
def _scale(values) -> float:
    return max((abs(float(v)) for v in values), default=0.0)


def compare_logs(out: Comparator, name: str, ours: List[Dict[str, float]], reference: List[Dict[str, float]],
                 first: int, keys: List[str], tolerance_of, discriminator_start: int, lecam_off: bool) -> None:
    """One row per step and key; the exact rules of item 1 (module docstring) override ``tolerance_of``."""
    for key in keys:
        scale = _scale(entry[key] for entry in reference)
        rows = []
        for index, (mine, theirs) in enumerate(zip(ours, reference)):
            k = first + index
            if key not in mine:
                rows.append(Result(f"{out.prefix}/{name}/{key}/step{k}", math.inf, 0.0, "not logged"))
                continue
            error = abs(mine[key] - theirs[key])
            exact = key in ("discriminator_factor", "d_weight")
            if k < discriminator_start and key in ("gan_loss", "weighted_gan_loss"):
                exact = True
            if lecam_off and (key == "lecam_loss" or (k < discriminator_start and key in ("d_loss", "grad_norm_disc"))):
                exact = True
            tolerance = 0.0 if exact else scale * tolerance_of(k, key)
            rows.append(Result(f"{out.prefix}/{name}/{key}/step{k}", error, tolerance, "exact" if exact else ""))
        out.add_rows(f"{out.prefix}/{name}/{key}", rows)


def _flatten_record(record: dict, prefix: str = "") -> Dict[str, torch.Tensor]:
    flat = {}
    for key, value in record.items():
        if isinstance(value, dict):
            flat.update(_flatten_record(value, f"{prefix}{key}/"))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def compare_per_step(out: Comparator, name: str, ours: List[dict], reference: dict, first: int, tolerance_of) -> None:
    stored = _flatten_record(reference)
    mine = [_flatten_record(r) for r in ours]
    for key, series in stored.items():
        if series.numel() == 0:
            continue
        scale = series.abs().max().item()
        rows = []
        for index, record in enumerate(mine):
            k = first + index
            label = f"{out.prefix}/{name}/{key}/step{k}"
            if key not in record:
                rows.append(Result(label, math.inf, 0.0, "not recorded"))
                continue
            rows.append(Result(label, out._error(record[key].reshape(series[k].shape), series[k]),
                               FORWARD_ATOL + scale * tolerance_of(k, key)))
        out.add_rows(f"{out.prefix}/{name}/{key}", rows)


def capture(modules) -> dict:
    """The states after a step, in the layout of the fixture's ``snapshots[k]``."""
    sit, ema, vae, loss_fn, optimizers = modules
    states = {label: {k: v.detach().clone() for k, v in module.state_dict().items()}
              for label, module in (("sit", sit), ("ema", ema), ("vae", vae), ("discriminator", loss_fn.discriminator))}
    states["optimizers"] = {theirs: copy.deepcopy(optimizers[ours].state_dict())
                            for ours, theirs in (("sit", "sit"), ("vae", "vae"), ("vae_loss", "loss_fn"))}
    return states


def _state_entries(snapshot: dict):
    """(row name, tensor) for every compared entry of a snapshot-like dict."""
    for label in ("sit", "ema", "vae", "discriminator"):
        for key, value in snapshot[label].items():
            yield f"{label}/{key}", value
    for theirs, state_dict in snapshot["optimizers"].items():
        for index, entry in state_dict["state"].items():
            for key, value in entry.items():
                yield f"optimizer_{theirs}/{int(index)}/{key}", value


def compare_snapshot(out: Comparator, name: str, ours: dict, snapshot: dict, parameter_names: Dict[str, set],
                     lrs: Dict[str, float], buffer_rtol: float, first_step: bool) -> None:
    """Parameters within some lr (module docstring), buffers (BN statistics) with the drift
    rule of the per-step records, counters exactly, Adam moments relative to each tensor's
    max plus 1e-5 of the largest value over the optimizer (the moments of entries whose
    gradient is rounding noise, docs/numerics.md#the-first-adamw-step, are themselves noise:
    that absolute term covers them)."""
    lr_of = {"sit": lrs["sit"], "ema": lrs["sit"], "vae": lrs["vae"], "discriminator": lrs["vae_loss"]}
    largest: Dict[str, float] = {}
    for theirs, state_dict in snapshot["optimizers"].items():
        for entry in state_dict["state"].values():
            for key, value in entry.items():
                largest[f"{theirs}/{key}"] = max(largest.get(f"{theirs}/{key}", 0.0), value.abs().max().item())
    mine = dict(_state_entries(ours))
    groups: Dict[str, List[Result]] = {}
    for entry_name, value in _state_entries(snapshot):
        group, rest = entry_name.split("/", 1)
        key = rest.rsplit("/", 1)[-1]
        counter = key.endswith("num_batches_tracked") or key == "step"
        if counter:
            group += "/counters"  # exact, on a line of their own
        full = f"{out.prefix}/{name}/{group}"
        rows = groups.setdefault(full, [])
        if entry_name not in mine:
            rows.append(Result(f"{full}/{rest}", math.inf, 0.0, "missing"))
            continue
        scale = value.abs().max().item() if value.numel() else 0.0
        if counter:
            tolerance = 0.0
        elif group.startswith("optimizer_"):
            theirs = group[len("optimizer_"):]
            rtol = 1e-4 if first_step else MOMENT_RTOL[theirs]
            tolerance = rtol * scale + MOMENT_GLOBAL_RTOL * largest[f"{theirs}/{key}"]
        elif rest in parameter_names[group] or group == "ema":
            units = FIRST_STEP_LR_UNITS if first_step and group != "ema" else STATE_LR_UNITS[group]
            tolerance = units * lr_of[group] + FORWARD_RTOL * scale
        else:
            tolerance = FORWARD_ATOL + buffer_rtol * scale
        rows.append(Result(f"{full}/{rest}", out._error(mine[entry_name], value), tolerance))
    for full, rows in groups.items():
        out.add_rows(full, rows)
    extra = sorted(set(mine) - {entry_name for entry_name, _ in _state_entries(snapshot)})
    if extra:
        out.results.append(Result(f"{out.prefix}/{name}/unexpected_state", math.inf, 0.0, f"{extra[:5]}"))


def check_e2e_trajectory(data: dict, out: Comparator) -> None:
    config, outputs = data["config"], data["outputs"]
    hp = config["hparams"]
    schedule = {"discriminator_start": int(config["discriminator_start"]),
                "lecam_off": float(hp.get("lecam_regularization_weight", 0.0)) == 0.0}
    lrs = {"sit": hp["learning_rate"], "vae": hp["vae_learning_rate"], "vae_loss": hp["disc_learning_rate"]}
    trunk = load_lpips_trunk(data)
    keys = list(outputs["log_keys"])
    num_steps = int(config["num_steps"])
    snapshots = {int(k): v for k, v in outputs["snapshots"].items()}
    segments = list(_segments(num_steps, list(snapshots)))

    def log_tolerance(k, key):
        return sit_log_tolerance(k) if key in SIT_LOGS else drift_tolerance(k)

    def run():
        step, modules = build_trajectory(data, trunk)
        all_logs, all_records, states = [], [], {}
        for first, last in segments:
            logs, records = replay(data, step, modules, first, last)
            all_logs += logs
            all_records += records
            if last in snapshots:
                states[last] = capture(modules)
        return modules, all_logs, all_records, states

    # The whole trajectory from the initial state.
    modules, ours_logs, ours_records, ours_states = run()
    sit, ema, vae, loss_fn, _ = modules
    parameter_names = {label: {n for n, _ in module.named_parameters()}
                       for label, module in (("sit", sit), ("ema", ema), ("vae", vae),
                                             ("discriminator", loss_fn.discriminator))}
    for k, snapshot in sorted(snapshots.items()):
        if k in ours_states:
            compare_snapshot(out, f"snapshot{k}", ours_states[k], snapshot, parameter_names, lrs, drift_tolerance(k),
                             first_step=k == 0)
    compare_logs(out, "logs", ours_logs, outputs["logs"], 0, keys, log_tolerance, **schedule)
    compare_per_step(out, "per_step", ours_records, outputs["per_step"], 0, lambda k, _key: drift_tolerance(k))

    # The tight late-step check: restart from the step-15 snapshot.
    if RESTART_STEP in snapshots:
        step, modules = build_trajectory(data, trunk)
        load_snapshot(snapshots[RESTART_STEP], modules)
        logs, records = replay(data, step, modules, RESTART_STEP + 1, num_steps - 1)
        compare_logs(out, f"restart{RESTART_STEP}/logs", logs, outputs["logs"][RESTART_STEP + 1:], RESTART_STEP + 1,
                     keys, lambda _k, _key: RESTART_RTOL, **schedule)
        last = num_steps - 1
        if last in snapshots:
            compare_snapshot(out, f"restart{RESTART_STEP}/snapshot{last}", capture(modules), snapshots[last],
                             parameter_names, lrs, RESTART_RTOL, first_step=False)


def _segments(num_steps: int, stops: List[int]):
    """[0, s0], [s0+1, s1], ... up to num_steps - 1, so snapshots are compared on the way."""
    first = 0
    for stop in sorted(s for s in stops if s < num_steps) + [num_steps - 1]:
        if stop >= first:
            yield first, stop
            first = stop + 1
