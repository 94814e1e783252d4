"""Parity check against fixtures produced by the official REPA-E implementation.

    python -m repa_e_fast.parity FILE.pt [FILE.pt ...]     (default: every fixture in
                                                            ../shared/reference/fixtures)

Each fixture is a ``torch.save``d dict with ``meta`` (``meta["fixture"]`` names its kind),
``config``, state dict(s), ``inputs`` and ``outputs`` (format of ``shared/reference``). We
rebuild the modules from ``config``, load the stored weights, replay the recorded
computation with our implementation and print one line per compared quantity: max abs
error, tolerance, PASS/FAIL. Exit status: 0 if everything passed, 1 if anything failed,
2 if a file could not be checked at all (unreadable, unknown kind).

Tolerances (fp32, CPU, docs/parity.md#tolerances): forward values ``1e-5 + 1e-4 *
max|ref|`` (VAE decoder ``5e-5 + 1e-4 * max|ref|``), gradients ``2e-5 * max|ref| + 1e-5 * (largest |gradient| of the
model)`` per tensor: the second term covers entries that are exactly zero in exact
arithmetic and rounding noise in fp32 (attention k biases, convs feeding GroupNorm(32)
with 32 channels).
"""

import argparse
import copy
import math
import os
import sys
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence

import torch

FORWARD_ATOL, FORWARD_RTOL = 1e-5, 1e-4
DECODER_ATOL = 5e-5
GRAD_RTOL = 2e-5
GRAD_GLOBAL_RTOL = 1e-5


@dataclass
class Result:
    name: str
    error: float
    tolerance: float
    note: str = ""

    @property
    def passed(self) -> bool:
        return self.error <= self.tolerance  # NaN compares False: a NaN never passes

    def line(self) -> str:
        status = "PASS" if self.passed else "FAIL"
        note = f"  ({self.note})" if self.note else ""
        return f"{status}  {self.name:<72} max_abs_err={self.error:.3e}  tol={self.tolerance:.3e}{note}"


class Comparator:
    """Collects comparisons of our tensors with the fixture's."""

    def __init__(self, prefix: str, verbose: bool = False):
        self.prefix = prefix
        self.verbose = verbose
        self.results: List[Result] = []

    def _error(self, ours, reference) -> float:
        ours = torch.as_tensor(ours).detach().double().cpu()
        reference = torch.as_tensor(reference).detach().double().cpu()
        if ours.shape != reference.shape:
            raise ValueError(f"shape {tuple(ours.shape)} vs fixture {tuple(reference.shape)}")
        if ours.numel() == 0:
            return 0.0
        return (ours - reference).abs().max().item()

    def add(self, name: str, ours, reference, atol: float = FORWARD_ATOL, rtol: float = FORWARD_RTOL) -> None:
        full = f"{self.prefix}/{name}"
        try:
            error = self._error(ours, reference)
        except (ValueError, RuntimeError) as problem:
            self.results.append(Result(full, math.inf, 0.0, str(problem)))
            return
        scale = torch.as_tensor(reference).detach().double().abs().max().item() if torch.as_tensor(reference).numel() else 0
        self.results.append(Result(full, error, atol + rtol * scale))

    def add_exact(self, name: str, ours, reference) -> None:
        self.add(name, ours, reference, atol=0.0, rtol=0.0)

    def add_list(self, name: str, ours: Sequence, reference: Sequence, **tol) -> None:
        if len(ours) != len(reference):
            self.results.append(Result(f"{self.prefix}/{name}", math.inf, 0.0, f"{len(ours)} vs {len(reference)} tensors"))
            return
        for index, (a, b) in enumerate(zip(ours, reference)):
            self.add(f"{name}[{index}]", a, b, **tol)

    def add_grads(self, name: str, ours: Dict[str, Optional[torch.Tensor]], reference: Dict[str, torch.Tensor],
                  extra_atol: Optional[Dict[str, float]] = None) -> None:
        """One line for a whole gradient dict (its worst tensor) unless verbose. ``extra_atol``
        adds a per-tensor slack (the measured sensitivity of a chained gradient)."""
        full = f"{self.prefix}/{name}"
        missing = sorted(set(reference) - set(ours))
        extra = sorted(set(ours) - set(reference))
        if missing or extra:
            self.results.append(Result(full, math.inf, 0.0, f"missing {missing[:5]} unexpected {extra[:5]}"))
            return
        global_scale = max((g.abs().max().item() for g in reference.values() if g.numel()), default=0.0)
        rows = []
        for key, ref in reference.items():
            grad = ours[key]
            if grad is None:
                rows.append(Result(f"{full}/{key}", math.inf, 0.0, "no gradient"))
                continue
            scale = ref.abs().max().item() if ref.numel() else 0.0
            tolerance = GRAD_RTOL * scale + GRAD_GLOBAL_RTOL * global_scale + (extra_atol or {}).get(key, 0.0)
            try:
                rows.append(Result(f"{full}/{key}", self._error(grad, ref), tolerance))
            except (ValueError, RuntimeError) as problem:
                rows.append(Result(f"{full}/{key}", math.inf, 0.0, str(problem)))
        self.add_rows(full, rows)

    def add_rows(self, full: str, rows: List[Result]) -> None:
        """All rows when verbose, else one line: the worst row (by error / tolerance)."""
        if self.verbose or not rows:
            self.results.extend(rows)
            return
        worst = max(rows, key=lambda r: (not r.passed, r.error / r.tolerance if r.tolerance else math.inf))
        failed = sum(not r.passed for r in rows)
        note = f"{len(rows)} tensors, worst {worst.name[len(full) + 1:]}" + (f", {failed} FAILED" if failed else "")
        self.results.append(Result(full, worst.error, worst.tolerance, note))


def _grads(module: torch.nn.Module) -> Dict[str, Optional[torch.Tensor]]:
    return {name: p.grad for name, p in module.named_parameters()}


# ----------------------------------------------------------------------------------------
# sit_forward
# ----------------------------------------------------------------------------------------
def check_sit_forward(data: dict, out: Comparator) -> None:
    from .models.sit import SiT, sincos_pos_embed_2d, timestep_frequency_embedding

    config, inputs, outputs = data["config"], data["inputs"], data["outputs"]
    base = SiT(**config["kwargs"])
    base.load_state_dict(data["state_dict"], strict=True)
    proj_coeff = config.get("proj_coeff_for_grads", 0.5)

    for name, record in outputs.get("records", {}).items():
        flags = {**config.get("records", {}).get(name, {}), **{k: record[k] for k in ("mode", "path_type", "align_only") if k in record}}
        model = copy.deepcopy(base)
        model.train(flags["mode"] == "train")
        model.y_embedder.dropout_prob = record.get("label_dropout_prob_used", 0.0)
        align_only = flags.get("align_only", False)
        model.requires_grad_(not align_only)  # pos_embed included (docs/numerics.md#pos_embed-is-trained)
        x = inputs["x"].clone().requires_grad_(True)
        result = model(
            x, inputs["y"], inputs["zs"], path_type=flags["path_type"], weighting=flags.get("weighting", "uniform"),
            align_only=align_only, time_input=inputs["time_input"], noises=inputs["noises"],
        )
        loss = result["proj_loss"] if align_only else result["denoising_loss"].mean() + proj_coeff * result["proj_loss"]
        loss.backward()
        _compare_sit_outputs(out, f"records/{name}", model, result, record)
        out.add(f"records/{name}/loss", loss, record["loss"])
        out.add(f"records/{name}/grad_x", x.grad, record["grad_x"])
        if record.get("grads") is not None:
            out.add_grads(f"records/{name}/grads", _grads(model), record["grads"])

    for name, record in outputs.get("sampled_records", {}).items():
        flags = {**config.get("sampled_records", {}).get(name, {}), **record}
        model = copy.deepcopy(base)
        model.train(flags["mode"] == "train")
        model.y_embedder.dropout_prob = flags.get("label_dropout_prob_used", model.y_embedder.dropout_prob)
        seen_labels = []
        hook = model.y_embedder.embedding_table.register_forward_pre_hook(lambda _m, args: seen_labels.append(args[0]))
        torch.manual_seed(flags["seed"])
        with torch.no_grad():
            result = model(inputs["x"], inputs["y"], inputs["zs"], path_type=flags["path_type"],
                           weighting=flags.get("weighting", "uniform"), align_only=flags.get("align_only", False))
        hook.remove()
        _compare_sit_outputs(out, f"sampled_records/{name}", model, result, record)
        if "effective_labels" in record:
            out.add_exact(f"sampled_records/{name}/effective_labels", seen_labels[0], record["effective_labels"])

    if "inference" in outputs:
        model = copy.deepcopy(base).eval()
        with torch.no_grad():
            velocity = model.inference(inputs["inference"]["x"], inputs["inference"]["t"], inputs["inference"]["y"])
        out.add("inference", velocity, outputs["inference"])

    aux = outputs.get("aux", {})
    if "timestep_frequency_embedding_256" in aux:
        out.add("aux/timestep_frequency_embedding_256",
                timestep_frequency_embedding(aux["timestep_t"], 256), aux["timestep_frequency_embedding_256"])
    for key, table in aux.items():
        if key.startswith("sincos_pos_embed"):
            grid, dim = math.isqrt(table.shape[0]), table.shape[1]
            out.add(f"aux/{key}", sincos_pos_embed_2d(dim, grid).float(), table)


def _compare_sit_outputs(out: Comparator, name: str, model, result: dict, record: dict) -> None:
    if record.get("model_output") is not None and result["model_output"] is not None:
        out.add(f"{name}/model_output", result["model_output"], record["model_output"])
    if record.get("denoising_loss") is not None:
        out.add(f"{name}/denoising_loss", result["denoising_loss"], record["denoising_loss"])
    elif result["denoising_loss"] is not None:
        out.results.append(Result(f"{out.prefix}/{name}/denoising_loss", math.inf, 0.0, "fixture has none, we computed one"))
    out.add(f"{name}/proj_loss", result["proj_loss"], record["proj_loss"])
    out.add_list(f"{name}/zs_tilde", result["zs_tilde"], record["zs_tilde"])
    for key in ("time_input", "noises"):
        if key in record:
            out.add(f"{name}/{key}", result[key], record[key])
    for key, value in record.get("bn_after", {}).items():
        out.add(f"{name}/bn_after/{key}", getattr(model.bn, key), value)


# ----------------------------------------------------------------------------------------
# vae_forward
# ----------------------------------------------------------------------------------------
def build_vae_from_config(layout_config: dict):
    from .models.vae import AutoencoderKL

    return AutoencoderKL(
        embed_dim=layout_config["embed_dim"],
        ch_mult=tuple(layout_config["ch_mult"]),
        ch=layout_config.get("ch", 128),
        num_res_blocks=layout_config.get("num_res_blocks", 2),
        attn_resolutions=tuple(layout_config.get("attn_resolutions", (16,))),
        resolution=layout_config.get("resolution", 256),
        dropout=layout_config.get("dropout", 0.0),
        in_channels=layout_config.get("in_channels", 3),
        out_ch=layout_config.get("out_ch", 3),
        use_variational=layout_config.get("use_variational", True),
    )


def check_vae_forward(data: dict, out: Comparator) -> None:
    from .models.vae import preprocess_images_for_vae

    inputs = data["inputs"]
    if "raw_uint8" in inputs:
        out.add_exact("inputs/images", preprocess_images_for_vae(inputs["raw_uint8"]), inputs["images"])
    for layout, layout_config in data["config"].items():
        if layout not in data["outputs"]:
            continue
        record = data["outputs"][layout]
        vae = build_vae_from_config(layout_config)
        vae.load_state_dict(data["state_dict"][layout], strict=True)
        vae.eval()
        images = inputs["images"].clone().requires_grad_(True)
        posterior = vae.encode(images)
        decoded = vae.decode(posterior.mean).sample
        kl = posterior.kl()
        scalar = decoded.square().mean() + kl.mean() * 1e-3  # the fixture's definition
        scalar.backward()
        for key, ours in (("moments", posterior.parameters), ("mean", posterior.mean), ("logvar", posterior.logvar),
                          ("std", posterior.std), ("var", posterior.var), ("kl", kl)):
            if key in record:
                out.add(f"{layout}/{key}", ours, record[key])
        out.add(f"{layout}/decoded_mean", decoded, record["decoded_mean"], atol=DECODER_ATOL)
        out.add(f"{layout}/scalar", scalar, record["scalar"])
        out.add(f"{layout}/grad_images", images.grad, record["grad_images"],
                atol=0.0, rtol=GRAD_RTOL * 10)
        out.add_grads(f"{layout}/grads", _grads(vae), record["grads"])
        sample = record.get("forward_sample")
        if sample is not None:
            torch.manual_seed(sample["seed"])
            with torch.no_grad():
                _, z, recon = vae(inputs["images"])
            out.add(f"{layout}/forward_sample/z", z, sample["z"])
            out.add(f"{layout}/forward_sample/eps", (z - posterior.mean.detach()) / posterior.std.detach(), sample["eps"], atol=1e-4)
            out.add(f"{layout}/forward_sample/recon", recon, sample["recon"], atol=DECODER_ATOL)


# ----------------------------------------------------------------------------------------
# dinov2_encoder
# ----------------------------------------------------------------------------------------
def check_dinov2_encoder(data: dict, out: Comparator) -> None:
    from .models.encoders import DinoVisionTransformer, load_dinov2_state_dict, parse_enc_type, preprocess_raw_image

    config, inputs, outputs = data["config"], data["inputs"], data["outputs"]
    kwargs = config["kwargs"]
    resolution = config.get("resolution", 256)
    spec = parse_enc_type(config.get("enc_type", "dinov2-vit-b"), resolution)[0]
    patch = kwargs.get("patch_size", 14)
    ffn = "swiglu" if "swiglu" in str(kwargs.get("ffn_layer", "mlp")) else "mlp"
    if kwargs.get("mlp_ratio", 4) != 4:
        raise ValueError(f"mlp_ratio {kwargs['mlp_ratio']} is not supported (DINOv2 uses 4)")
    grid = 16 * (resolution // 256)
    model = DinoVisionTransformer(kwargs["embed_dim"], kwargs["depth"], kwargs["num_heads"], ffn, patch,
                                  kwargs.get("num_register_tokens", 0), grid)
    load_dinov2_state_dict(model, data["raw_state_dict"], "fixture DINOv2")
    model.eval()
    out.add("resampled_pos_embed", model.pos_embed, outputs["resampled_pos_embed"])
    if "state_dict" in data:
        reference_state = data["state_dict"]
        ours = model.state_dict()
        for key, value in reference_state.items():
            if key != "pos_embed" and key in ours:
                out.add_exact(f"state_dict/{key}", ours[key], value)
    preprocessed = preprocess_raw_image(inputs["raw_uint8"], spec.encoder_type, resolution)
    out.add("preprocessed", preprocessed, outputs["preprocessed"])
    with torch.no_grad():
        features = model.forward_features(preprocessed)
    for key in ("x_norm_patchtokens", "x_norm_clstoken", "x_norm_regtokens", "x_prenorm"):
        if key in outputs:
            out.add(key, features[key], outputs[key])


# ----------------------------------------------------------------------------------------
# vae_loss
# ----------------------------------------------------------------------------------------
def _bn_after(module: torch.nn.Module, prefix: str, out: Comparator, reference: dict) -> None:
    """Compare BatchNorm buffers; ``reference`` is {"main.3": {"running_mean": ...}, ...}
    or flat {"main.3.running_mean": ...}."""
    buffers = dict(module.named_buffers())
    for layer, entry in reference.items():
        items = entry.items() if isinstance(entry, dict) else [(None, entry)]
        for key, value in items:
            name = f"{layer}.{key}" if key is not None else layer
            out.add(f"{prefix}/{name}", buffers[name], value)


def build_vae_loss(loss_config: dict, state_dict: dict, extra: Optional[dict] = None,
                   discriminator_kwargs: Optional[dict] = None):
    """The VAE loss module; ``discriminator_kwargs`` replace its PatchGAN before loading (the
    e2e_trajectory fixture swaps in an ndf=8 one)."""
    from .losses.vae_loss import VAELossConfig, VAERegularizationLoss
    from .models.discriminator import NLayerDiscriminator

    module = VAERegularizationLoss(VAELossConfig.from_official(loss_config))
    if discriminator_kwargs is not None:
        kwargs = {k: v for k, v in discriminator_kwargs.items() if k != "use_actnorm"}
        if discriminator_kwargs.get("use_actnorm"):
            raise ValueError("use_actnorm=True discriminators are not supported (REPA-E uses BatchNorm)")
        module.discriminator = NLayerDiscriminator(**kwargs)
    state = dict(state_dict)
    state.update(extra or {})
    own = module.state_dict()
    for key in ("ema_real_logits_mean", "ema_fake_logits_mean", "logvar"):
        if key in own and key not in state:
            state[key] = own[key]  # never saved by the official trainer (checkpoint_format.json)
    module.load_state_dict(state, strict=True)
    return module


def _generator_call(module, inputs: dict, record: dict, out: Comparator, prefix: str) -> None:
    from .models.vae import DiagonalGaussianDistribution

    recon = inputs["reconstructions"].clone().requires_grad_(True)
    moments = inputs["moments"].clone().requires_grad_(True)
    loss, loss_dict = module(inputs["inputs"], recon, DiagonalGaussianDistribution(moments), 0, "generator")
    loss.backward()
    out.add(f"{prefix}/total_loss", loss, record["total_loss"])
    for key, value in record["loss_dict"].items():
        out.add(f"{prefix}/loss_dict/{key}", loss_dict[key], value)
    out.add(f"{prefix}/grad_reconstructions", recon.grad, record["grad_reconstructions"], atol=1e-8, rtol=1e-4)
    out.add(f"{prefix}/grad_moments", moments.grad, record["grad_moments"], atol=1e-8, rtol=1e-4)
    stray = [n for n, p in module.named_parameters() if p.grad is not None]
    out.results.append(Result(f"{out.prefix}/{prefix}/no_param_grads", float(len(stray)), 0.0,
                              f"parameters that received a gradient: {stray[:3]}" if stray else ""))
    _bn_after(module.discriminator, f"{prefix}/disc_bn_after", out, record.get("disc_bn_after", {}))


def _discriminator_call(module, real, fake, record: dict, out: Comparator, prefix: str) -> None:
    loss, loss_dict = module(real, fake, None, 0, "discriminator")
    out.add(f"{prefix}/total_loss", loss, record["total_loss"])
    for key, value in record["loss_dict"].items():
        out.add(f"{prefix}/loss_dict/{key}", loss_dict[key], value)
    _bn_after(module.discriminator, f"{prefix}/disc_bn_after", out, record.get("disc_bn_after", {}))
    for key in ("ema_real_logits_mean", "ema_fake_logits_mean"):
        if f"{key}_after" in record:
            out.add(f"{prefix}/{key}_after", getattr(module, key), record[f"{key}_after"])


def check_vae_loss(data: dict, out: Comparator) -> None:
    from .models.vae import preprocess_images_for_vae

    config, inputs, outputs = data["config"], data["inputs"], data["outputs"]
    for raw, images in (("raw_uint8", "inputs"), ("raw_uint8_2", "inputs2")):
        if raw in inputs:
            out.add_exact(f"inputs/{images}", preprocess_images_for_vae(inputs[raw]), inputs[images])
    module = build_vae_loss(config["loss_config"], data["state_dict"])
    if "generator" in outputs:
        _generator_call(module, inputs, outputs["generator"], out, "generator")
    if "discriminator" in outputs:  # same module object: BN stats continue from the generator call
        _discriminator_call(module, inputs["inputs"], inputs["reconstructions"], outputs["discriminator"], out,
                            "discriminator")
    if "lecam" in outputs:
        module = build_vae_loss(config["lecam_loss_config"], data["state_dict"], data.get("lecam_state_dict_extra"))
        pairs = [("inputs", "reconstructions"), ("inputs2", "reconstructions2")]
        for index, record in enumerate(outputs["lecam"]["calls"]):
            real, fake = pairs[index % 2]
            _discriminator_call(module, inputs[real], inputs[fake], record, out, f"lecam/calls[{index}]")
    if "logvar_variant" in outputs:
        module = build_vae_loss(config["logvar_loss_config"], data["state_dict"], data.get("logvar_state_dict_extra"))
        _generator_call(module, inputs, outputs["logvar_variant"]["generator"], out, "logvar_variant/generator")


# ----------------------------------------------------------------------------------------
# e2e_step
# ----------------------------------------------------------------------------------------
def build_e2e_step(data: dict):
    """Modules, optimizers and step exactly as the fixture's config describes them."""
    from .engine.build import make_backend
    from .engine.step import REPAEStep, StepConfig
    from .models.sit import SiT

    config, states = data["config"], data["state_dicts"]
    hp = config["hparams"]
    sit, ema = SiT(**config["sit"]["kwargs"]), SiT(**config["sit"]["kwargs"])
    sit.load_state_dict(states["sit"], strict=True)
    ema.load_state_dict(states["ema"], strict=True)
    ema.requires_grad_(False)
    if "disabled" in str(config.get("label_dropout", "")):
        sit.y_embedder.dropout_prob = 0.0
    vae = build_vae_from_config(config["vae"])
    vae.load_state_dict(states["vae"], strict=True)
    loss_config = config["loss_config"]
    if "lecam_regularization_weight" in hp:
        loss_config = {**loss_config, "losses": {**loss_config["losses"],
                                                 "lecam_regularization_weight": hp["lecam_regularization_weight"]}}
    loss_fn = build_vae_loss(loss_config, states["loss_module"],
                             discriminator_kwargs=config.get("discriminator", {}).get("kwargs"))
    adam = dict(betas=(hp["adam_beta1"], hp["adam_beta2"]), eps=hp["adam_epsilon"], weight_decay=hp["adam_weight_decay"])
    lrs = {"sit": hp["learning_rate"], "vae": hp["vae_learning_rate"], "vae_loss": hp["disc_learning_rate"]}
    backend = make_backend("single", {"sit": sit, "vae": vae, "vae_loss": loss_fn},
                           {name: dict(lr=lr, **adam) for name, lr in lrs.items()}, precision="fp32")
    optimizers = backend.optimizers
    step_config = StepConfig(path_type=hp["path_type"], weighting=hp["weighting"], proj_coeff=hp["proj_coeff"],
                             vae_align_proj_coeff=hp["vae_align_proj_coeff"], max_grad_norm=hp["max_grad_norm"],
                             ema_decay=hp["ema_decay"], align_pass_final_layer=True)
    if hp.get("prediction", "v") != "v":
        raise ValueError(f"prediction {hp['prediction']!r} is not supported (REPA-E uses v-prediction)")
    return REPAEStep(backend, ema, step_config), (sit, ema, vae, loss_fn, optimizers)


def step_by_phase(step, images, labels, global_step: int, zs, posterior_noise=None, time_input=None, noises=None):
    """One ``REPAEStep`` call run phase by phase, in ``__call__``'s order, keeping what the
    fixtures record: each phase's outputs, the VAE loss's gradients w.r.t. the moments, z
    and the reconstruction, and the VAE and SiT gradients before clipping.
    Returns (logs, intermediate)."""
    logs: Dict[str, torch.Tensor] = {}
    step.begin()
    vae_out = step.vae_forward(images, posterior_noise)
    z, moments, recon = vae_out["z"], vae_out["posterior"].parameters, vae_out["recon_image"]
    for tensor in (z, moments, recon):
        tensor.retain_grad()
    inter = step.vae_backward(vae_out, labels, zs, global_step, logs, time_input, noises)
    inter.update(step.discriminator_backward(vae_out, global_step, logs))
    align = inter["vae_align"]
    inter.update(step.sit_backward(z, labels, zs, logs, align["time_input"], align["noises"]))
    # Only pass (A) reaches the VAE and these tensors (B and C see detached copies).
    inter.update(processed_image=vae_out["processed_image"], moments=moments.detach(), z=z.detach(),
                 recon_image=recon.detach(), time_input=align["time_input"], noises=align["noises"],
                 vae_loss_grad_wrt_z=z.grad.clone(), vae_loss_grad_wrt_moments=moments.grad.clone(),
                 vae_loss_grad_wrt_recon_image=recon.grad.clone())
    for name in ("vae", "sit"):
        inter[f"{name}_grads_before_clip"] = {n: p.grad.clone() for n, p in step.backend.unwrap(name).named_parameters()
                                              if p.grad is not None}
    step.update_models(logs)
    return logs, inter


def check_e2e_step(data: dict, out: Comparator) -> None:
    """The chained step, plus each stage on the reference's own inputs (``parity_stages``):
    the chained values' tolerances grow by the stage's measured sensitivity."""
    from .parity_stages import LOG_SOURCES, SENSITIVITY_FACTOR, check_stages

    config, inputs, outputs = data["config"], data["inputs"], data["outputs"]
    step, (sit, ema, vae, loss_fn, optimizers) = build_e2e_step(data)
    initial_modules = build_e2e_step(data)[1]
    lr = config["hparams"]["learning_rate"]
    torch.manual_seed(config["rng_seed"])
    logs, inter = step_by_phase(step, inputs["raw_image"], inputs["labels"], inputs.get("global_step", 0),
                                inputs["zs"], time_input=inputs.get("explicit_time_input"),
                                noises=inputs.get("explicit_noises"))
    ref = outputs["intermediate"]
    sensitivity = check_stages(data, out, initial_modules, step.config, inter["processed_image"])

    def slack(key: str) -> float:
        return SENSITIVITY_FACTOR * sensitivity.get(key, 0.0)

    for key, value in outputs["logs"].items():
        source = LOG_SOURCES.get(key) or next((f"{group}/{key}" for group in ("vae_loss_dict", "d_loss_dict")
                                               if key in ref.get(group, {})), key)
        out.add(f"logs/{key}", logs[key], value, atol=FORWARD_ATOL + slack(source))
    decoder_keys = {"recon_image", "vae_loss_grad_wrt_recon_image"}
    for key in ("processed_image", "moments", "z", "recon_image", "time_input", "noises", "vae_generator_loss",
                "vae_loss_total", "d_loss", "sit_loss"):
        if key in ref:
            atol = DECODER_ATOL if key in decoder_keys else FORWARD_ATOL
            out.add(f"intermediate/{key}", inter[key], ref[key], atol=atol + slack(key))
    if "posterior_eps" in ref:
        moments = inter["moments"]
        mean, logvar = moments.chunk(2, dim=1)
        eps = (inter["z"] - mean) / torch.exp(0.5 * logvar.clamp(-30, 20))
        out.add("intermediate/posterior_eps", eps, ref["posterior_eps"], atol=1e-4)
    for key in ("vae_loss_grad_wrt_moments", "vae_loss_grad_wrt_z", "vae_loss_grad_wrt_recon_image"):
        if key in ref:
            out.add(f"intermediate/{key}", inter[key], ref[key], atol=1e-8 + slack(key), rtol=GRAD_RTOL * 10)
    for key in ("vae_loss_dict", "d_loss_dict"):
        for name, value in ref.get(key, {}).items():
            out.add(f"intermediate/{key}/{name}", inter[key][name], value, atol=FORWARD_ATOL + slack(f"{key}/{name}"))
    for key in ("vae_align", "sit"):
        for name, value in ref.get(key, {}).items():
            if value is None or name in ("time_input", "noises"):
                continue
            ours = inter[key][name]
            if isinstance(value, (list, tuple)):
                out.add_list(f"intermediate/{key}/{name}", ours, value)
            elif torch.is_tensor(value):
                out.add(f"intermediate/{key}/{name}", ours, value, atol=FORWARD_ATOL + slack(f"{key}/{name}"))
    for key in ("vae_grads_before_clip", "sit_grads_before_clip"):
        if key in ref:
            extra = {name: slack(f"{key}/{name}") for name in ref[key]}
            out.add_grads(f"intermediate/{key}", inter[key], ref[key], extra_atol=extra)
    for key in ("grad_norm_vae", "grad_norm_disc", "grad_norm_sit"):
        if key in ref:
            out.add(f"intermediate/{key}", logs[key], ref[key])

    # After the step: parameters moved by ~lr * sign(g) (docs/numerics.md#the-first-adamw-step),
    # so updates of entries whose gradient is rounding noise may differ by up to ~2 lr;
    # gradients were compared above.
    after = outputs.get("state_dicts_after", {})
    state_atol = 2.5 * lr
    for name, module in (("sit", sit), ("ema", ema), ("vae", vae), ("discriminator", loss_fn.discriminator)):
        if name not in after:
            continue
        ours, parameters = module.state_dict(), dict(module.named_parameters())
        full = f"{out.prefix}/state_dicts_after/{name}"
        rows = []
        for key, value in after[name].items():
            atol = state_atol if key in parameters and name != "ema" else FORWARD_ATOL
            tolerance = atol + FORWARD_RTOL * value.abs().max().item()
            error = out._error(ours[key], value) if key in ours else math.inf
            rows.append(Result(f"{full}/{key}", error, tolerance))
        out.add_rows(full, rows)
    for key, value in after.get("loss_module_lecam_buffers", {}).items():
        out.add(f"state_dicts_after/loss_module_lecam_buffers/{key}", getattr(loss_fn, key), value)
    for prefix, module in (("sit_bn_after", sit), ("ema_bn_after", ema)):
        for key, value in outputs.get(prefix, {}).items():
            out.add(f"{prefix}/{key}", getattr(module.bn, key), value)
    reference_opt = outputs.get("sit_optimizer_state_after")
    if reference_opt is not None:
        if "state" in reference_opt:  # a full optimizer state dict, or just its "state"
            reference_opt = reference_opt["state"]
        ours = optimizers["sit"].state_dict()["state"]
        names = [n for n, _ in sit.named_parameters()]
        full = f"{out.prefix}/sit_optimizer_state_after"
        rows = []
        for index, entry in reference_opt.items():
            for key, value in entry.items():
                mine = ours.get(int(index), {}).get(key)
                label = f"{full}/{names[int(index)]}/{key}"
                if mine is None:
                    rows.append(Result(label, math.inf, 0.0, "no optimizer state"))
                else:
                    rows.append(Result(label, out._error(mine, value), 1e-9 + 1e-4 * value.abs().max().item()))
        extra = sorted(set(ours) - {int(i) for i in reference_opt})
        if extra:
            rows.append(Result(f"{full}/unexpected_state", math.inf, 0.0, f"state for parameters {extra[:5]}"))
        out.add_rows(full, rows)


CHECKERS: Dict[str, Callable[[dict, Comparator], None]] = {
    "sit_forward": check_sit_forward,
    "vae_forward": check_vae_forward,
    "dinov2_encoder": check_dinov2_encoder,
    "vae_loss": check_vae_loss,
    "e2e_step": check_e2e_step,
    "samplers": lambda data, out: _samplers_checker()(data, out),
    "encoder": lambda data, out: _encoder_checker()(data, out),
    "e2e_trajectory": lambda data, out: _trajectory_checker()(data, out),
}


def _samplers_checker():
    from .parity_samplers import check_samplers  # imports parity's Comparator itself

    return check_samplers


def _encoder_checker():
    from .parity_encoders import check_encoder  # imports parity's Comparator itself

    return check_encoder


def _trajectory_checker():
    from .parity_trajectory import check_e2e_trajectory

    return check_e2e_trajectory


def fixture_kind(data: dict) -> Optional[str]:
    """``meta.kind`` where a fixture has it (one kind, several files: ``encoder_*``), else
    ``meta.fixture``."""
    meta = data.get("meta", {})
    return meta.get("kind") or meta.get("fixture")


def load_fixture(path: str) -> dict:
    from .models.checkpoints import safe_torch_load

    return safe_torch_load(path)


def run_fixture(path_or_data, verbose: bool = False) -> List[Result]:
    """Check one fixture (a path or an already loaded dict); returns every comparison."""
    data = load_fixture(path_or_data) if isinstance(path_or_data, str) else path_or_data
    if isinstance(path_or_data, str):
        data.setdefault("source_path", path_or_data)  # a fixture may refer to a sibling file
    kind = fixture_kind(data)
    if kind not in CHECKERS:
        raise ValueError(f"unknown fixture kind {kind!r}; supported: {sorted(CHECKERS)}")
    comparator = Comparator(data["meta"].get("fixture", kind), verbose)
    with torch.random.fork_rng(devices=[]):
        CHECKERS[kind](data, comparator)
    return comparator.results


def default_fixture_paths() -> List[str]:
    here = os.path.join(os.getcwd(), "..", "shared", "reference", "fixtures")
    folder = os.environ.get("REPA_E_FAST_FIXTURES", here)
    if not os.path.isdir(folder):
        return []
    return sorted(os.path.join(folder, f) for f in os.listdir(folder) if f.endswith(".pt"))


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m repa_e_fast.parity", description=__doc__.split("\n\n")[0])
    parser.add_argument("files", nargs="*", help="fixture files (default: $REPA_E_FAST_FIXTURES or ../shared/reference/fixtures/*.pt)")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (the fixtures were made with 1)")
    parser.add_argument("--verbose", "-v", action="store_true", help="one line per gradient tensor")
    args = parser.parse_args(argv)
    files = args.files or default_fixture_paths()
    if not files:
        parser.error("no fixture files given and none found in ../shared/reference/fixtures")
    torch.set_num_threads(args.threads)
    status, passed, failed = 0, 0, 0
    for path in files:
        print(f"== {path}")
        try:
            results = run_fixture(path, args.verbose)
        except Exception as problem:  # noqa: BLE001 - reported per file, the run goes on
            print(f"ERROR {path}: {type(problem).__name__}: {problem}")
            status = 2
            continue
        for result in results:
            print(result.line())
        passed += sum(r.passed for r in results)
        failed += sum(not r.passed for r in results)
    print(f"parity: {passed} passed, {failed} failed")
    if failed and status == 0:
        status = 1
    return status


if __name__ == "__main__":
    sys.exit(main())
