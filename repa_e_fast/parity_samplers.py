"""Parity check for fixtures of kind ``samplers`` (docs/sampling.md#parity).

For every recorded run we seed torch as the fixture did, call our sampler with the run's
kwargs and compare: the float64 output, every ``torch.randn_like`` draw made during the
call (bit-exact: same generator, dtype and shape) and every ``model.inference`` call's
inputs and output (the labels exactly, the times to within one float32 ulp). A different
number of draws or calls fails.

Tolerances: the Comparator defaults (``1e-5 + 1e-4 * max|ref|``, docs/parity.md#tolerances);
the fixture's authors measured the natural fp32 noise of the sampler outputs at 6.3e-7
(cfg 1) / 3.1e-6 (cfg 4) on values of scale 5.7 / 10.

The per-call comparisons are condensed into one line per run and quantity (its worst call)
unless the Comparator is verbose.
"""

import math
from typing import TYPE_CHECKING, Dict, List

import torch

from . import sampling

if TYPE_CHECKING:  # parity.py imports this module lazily: no runtime import at module level
    from .parity import Comparator

_COMMON_KWARGS = {"num_steps", "cfg_scale", "guidance_low", "guidance_high", "path_type"}
SAMPLERS = {  # official function name -> (our sampler, the official kwargs it honours)
    "euler_sampler": (sampling.euler_sampler, _COMMON_KWARGS | {"heun"}),
    "euler_maruyama_sampler": (sampling.euler_maruyama_sampler, _COMMON_KWARGS),
}
TIME_ATOL = 1e-7  # one float32 ulp below t = 1 is 6e-8


def _sit_kwargs(config: dict) -> dict:
    """The SiT constructor kwargs, stored either flat or under ``config["kwargs"]``."""
    return dict(config["kwargs"]) if isinstance(config.get("kwargs"), dict) else dict(config)


class _Recorder:
    """Records model.inference calls and torch.randn_like draws while active."""

    def __init__(self, model):
        self.model = model
        self.calls: List[Dict[str, torch.Tensor]] = []
        self.draws: List[torch.Tensor] = []

    def __enter__(self):
        inference, randn_like = self.model.inference, torch.randn_like

        def recording_inference(x, t, y):
            out = inference(x, t, y)
            self.calls.append({"x": x.clone(), "t": t.clone(), "y": y.clone(), "out": out.clone()})
            return out

        def recording_randn_like(*args, **kwargs):
            draw = randn_like(*args, **kwargs)
            self.draws.append(draw.clone())
            return draw

        self._randn_like = randn_like
        self.model.inference = recording_inference  # instance attribute shadows the method
        torch.randn_like = recording_randn_like
        return self

    def __exit__(self, *exc):
        torch.randn_like = self._randn_like
        del self.model.inference
        return False


def _ratio(result) -> float:
    if result.tolerance:
        return result.error / result.tolerance
    return math.inf if result.error > 0 else 0.0


def _add_condensed(out: "Comparator", name: str, ours: List[torch.Tensor], refs: List[torch.Tensor], **tol) -> None:
    """One Comparator line per list (its worst entry) unless verbose; a length mismatch fails."""
    from .parity import Comparator, Result

    if len(ours) != len(refs):
        out.results.append(Result(f"{out.prefix}/{name}", math.inf, 0.0, f"{len(ours)} vs {len(refs)} in the fixture"))
        return
    if out.verbose:
        out.add_list(name, ours, refs, **tol)
        return
    scratch = Comparator(out.prefix)
    scratch.add_list(name, ours, refs, **tol)
    if not scratch.results:  # e.g. no noise draws in an ODE run: checked, nothing to compare
        out.results.append(Result(f"{out.prefix}/{name}", 0.0, 0.0, "0 entries"))
        return
    worst = max(scratch.results, key=lambda r: (not r.passed, _ratio(r)))
    failed = sum(not r.passed for r in scratch.results)
    note = f"{len(refs)} entries, worst {worst.name.rsplit('/', 1)[-1]}" + (f", {failed} FAILED" if failed else "")
    out.results.append(Result(f"{out.prefix}/{name}", worst.error, worst.tolerance, note))


def check_samplers(data: dict, out: "Comparator") -> None:
    from .models.sit import SiT
    from .parity import Result

    model = SiT(**_sit_kwargs(data["config"]))
    model.load_state_dict(data["state_dict"], strict=True)
    model.eval()
    latents, labels = data["inputs"]["latents"], data["inputs"]["y"]

    for tag, run in data["outputs"]["runs"].items():
        function_name = run["function"].rsplit(".", 1)[-1]
        if function_name not in SAMPLERS:
            out.results.append(Result(f"{out.prefix}/runs/{tag}", math.inf, 0.0, f"unknown sampler {run['function']!r}"))
            continue
        sampler, supported = SAMPLERS[function_name]
        unsupported = sorted(set(run["kwargs"]) - supported)
        if unsupported:
            out.results.append(Result(f"{out.prefix}/runs/{tag}", math.inf, 0.0, f"cannot honour kwargs {unsupported}"))
            continue

        torch.manual_seed(run["seed"])
        with _Recorder(model) as recorder:
            output = sampler(model, latents.clone(), labels.clone(), **run["kwargs"])

        out.add(f"runs/{tag}/output", output, run["output"])
        _add_condensed(out, f"runs/{tag}/noise_draws", recorder.draws, run["noise_draws"], atol=0.0, rtol=0.0)
        calls, ref_calls = recorder.calls, run["inference_calls"]
        if len(calls) != len(ref_calls):
            out.results.append(Result(f"{out.prefix}/runs/{tag}/inference_calls", math.inf, 0.0,
                                      f"{len(calls)} calls vs {len(ref_calls)} in the fixture"))
            continue
        for key, tol in (("x", {}), ("t", {"atol": TIME_ATOL, "rtol": 0.0}), ("y", {"atol": 0.0, "rtol": 0.0}), ("out", {})):
            _add_condensed(out, f"runs/{tag}/inference_calls/{key}", [c[key] for c in calls], [c[key] for c in ref_calls], **tol)
