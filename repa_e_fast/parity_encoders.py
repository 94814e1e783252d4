"""Parity of the fixture kind ``encoder`` (MoCo v3, MAE, I-JEPA, CLIP; docs/parity.md#fixture-kinds).

The tiny official encoder is rebuilt from ``config`` with our ``VisionTransformer``, its
``raw_checkpoint`` (the file the official loader read) goes through our file reader and
layout conversion, and we compare:

- the loaded state dict with the official loaded encoder's (exact; ``pos_embed`` after
  resampling with the forward tolerance);
- ``preprocessed`` from the raw uint8 images;
- ``forward_features`` and ``zs[0]`` (the REPA target) on the stored ``preprocessed`` (the
  reference's own input: the fixture's authors suggest ``atol=2e-5``);
- the whole chain raw uint8 -> target through ``RepresentationEncoder`` (``atol=2e-4``:
  the bicubic resize of I-JEPA and CLIP inputs is fp32-sensitive, as the authors measured).
"""

import math
import os
import tempfile

import torch

from .parity import FORWARD_ATOL, FORWARD_RTOL, Comparator, Result

FEATURE_ATOL = 2e-5
CHAINED_ATOL = 2e-4


def build_fixture_encoder(config: dict):
    """Our backbone with the tiny sizes the fixture's official encoder had."""
    from .models.encoders import PATCH_SIZES, build_backbone, encoder_family

    family = encoder_family(config["encoder_type"])
    grid = config.get("resolution", 256) // 16
    if family == "clip":
        visual = config["visual_kwargs"]
        if visual["heads"] != visual["width"] // 64 or visual["patch_size"] != PATCH_SIZES["clip"]:
            raise ValueError(f"CLIP visual config {visual} is not what clip.model.build_model makes")
        return family, build_backbone(family, visual["width"], visual["layers"], visual["heads"], grid)
    kwargs = config["kwargs"]
    checks = {"patch_size": PATCH_SIZES[family], "mlp_ratio": 4, "qkv_bias": True}
    for key, expected in checks.items():
        if kwargs.get(key, expected) != expected:
            raise ValueError(f"{family} fixture has {key}={kwargs[key]!r}; the official encoder uses {expected!r}")
    if "eps=1e-06" not in str(kwargs.get("norm_layer", "eps=1e-06")):
        raise ValueError(f"{family} fixture norm layer {kwargs['norm_layer']!r}: expected LayerNorm eps 1e-6")
    return family, build_backbone(family, kwargs["embed_dim"], kwargs["depth"], kwargs["num_heads"], grid)


def official_forward_features(family: str, model, preprocessed: torch.Tensor) -> torch.Tensor:
    """What the official ``encoder.forward_features`` returns (docs/numerics.md#encoder-targets)."""
    tokens = model.forward_tokens(preprocessed)
    if family in ("mocov3", "jepa"):
        return model.norm(tokens)  # MoCo v3 keeps cls here; train_repae.py drops it afterwards
    return tokens[:, 1:]  # MAE, CLIP: cls dropped, no final norm


def official_state_to_ours(family: str, state: dict, grid: int) -> dict:
    from .models.encoder_checkpoints import clip_visual_to_state_dict

    if family == "clip":  # UpdatedVisionTransformer: "model." + the visual keys
        return clip_visual_to_state_dict(state, grid, prefix="model.", source="fixture state_dict")
    return dict(state)


def check_encoder(data: dict, out: Comparator) -> None:
    from .models.encoder_checkpoints import read_official_checkpoint
    from .models.encoders import RepresentationEncoder, load_official_state_dict, parse_enc_type, preprocess_raw_image

    config, inputs, outputs = data["config"], data["inputs"], data["outputs"]
    resolution = config.get("resolution", 256)
    (spec,) = parse_enc_type(config["enc_type"], resolution)  # the enc_type string itself is accepted
    family, model = build_fixture_encoder(config)
    if spec.family != family:
        raise ValueError(f"enc_type {config['enc_type']!r} parses as family {spec.family}, fixture says {family}")

    # The loader's own path: the raw checkpoint as a file under its official name.
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, spec.checkpoint_name)
        torch.save(data["raw_checkpoint"], path)
        load_official_state_dict(model, family, read_official_checkpoint(path), f"fixture {spec}")
    model.eval()

    reference = official_state_to_ours(family, data["state_dict"], config.get("resolution", 256) // 16)
    ours = model.state_dict()
    full = f"{out.prefix}/state_dict"
    rows = []
    for key in sorted(set(reference) | set(ours)):
        if key not in ours or key not in reference:
            rows.append(Result(f"{full}/{key}", math.inf, 0.0, "only in the fixture" if key in reference else "only in ours"))
            continue
        value = reference[key]
        tolerance = FORWARD_ATOL + FORWARD_RTOL * value.abs().max().item() if key == "pos_embed" else 0.0
        rows.append(Result(f"{full}/{key}", out._error(ours[key], value), tolerance))
    out.add_rows(full, rows)
    if "pos_embed_resample" in config:
        out.add("resampled_pos_embed", model.pos_embed, reference["pos_embed"])

    raw = inputs["raw_uint8"]
    out.add("preprocessed", preprocess_raw_image(raw, spec.encoder_type, resolution), outputs["preprocessed"])
    stored = outputs["preprocessed"]
    with torch.no_grad():
        features = official_forward_features(family, model, stored)
        target = model.repa_target(stored)
        chained = RepresentationEncoder(spec, model, resolution)(raw)
    out.add("forward_features", features, outputs["forward_features"], atol=FEATURE_ATOL)
    out.add_list("zs", [target], outputs["zs"], atol=FEATURE_ATOL)
    out.add_list("zs_from_raw_uint8", [chained], outputs["zs"], atol=CHAINED_ATOL)
    out.results.append(Result(f"{out.prefix}/z_dim", abs(model.embed_dim - config["z_dim"]), 0.0))
