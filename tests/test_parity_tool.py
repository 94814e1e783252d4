"""The parity command handles configs other than the shipped fixtures, and can fail.

We write fixture-format files from our own modules for configurations the shipped fixtures
do not cover (several encoders, patch 4, qk-norm, a 512 px DINOv2 with registers and the
SwiGLU FFN, a two-level VAE), check that the command passes on them, and that it fails
with exit status 1 when one stored number is perturbed, and 2 on an unknown kind.
"""

import copy

import pytest
import torch

from repa_e_fast import parity
from repa_e_fast.models.encoders import DinoVisionTransformer, preprocess_raw_image
from repa_e_fast.models.sit import SiT
from repa_e_fast.models.vae import AutoencoderKL


def randomize(module, generator, std=0.2):
    with torch.no_grad():
        for tensor in module.parameters():
            tensor.copy_(torch.randn(tensor.shape, generator=generator) * std)


def make_sit_fixture():
    gen = torch.Generator().manual_seed(0)
    kwargs = dict(depth=3, hidden_size=32, decoder_hidden_size=32, patch_size=4, num_heads=2, input_size=8,
                  in_channels=3, z_dims=[16, 24], encoder_depth=2, projector_dim=32, mlp_ratio=2.0,
                  qk_norm=True, fused_attn=True, class_dropout_prob=0.2, num_classes=5, bn_momentum=0.1)
    model = SiT(**kwargs)
    randomize(model, gen)
    model.bn.running_mean.copy_(torch.randn(3, generator=gen))
    model.bn.running_var.copy_(torch.rand(3, generator=gen) + 0.5)
    inputs = {
        "x": torch.randn(2, 3, 8, 8, generator=gen), "y": torch.tensor([1, 4]),
        "zs": [torch.randn(2, 4, 16, generator=gen), torch.randn(2, 4, 24, generator=gen)],
        "time_input": torch.rand(2, 1, 1, 1, generator=gen), "noises": torch.randn(2, 3, 8, 8, generator=gen),
        "inference": {"x": torch.randn(2, 3, 8, 8, generator=gen), "t": torch.tensor([0.3, 0.9]), "y": torch.tensor([5, 2])},
    }
    records, configs = {}, {}
    for name, mode, path_type, align_only in [("train_cosine", "train", "cosine", False),
                                              ("align_only_eval_linear", "eval", "linear", True)]:
        m = copy.deepcopy(model).train(mode == "train").requires_grad_(not align_only)
        m.y_embedder.dropout_prob = 0.0
        x = inputs["x"].clone().requires_grad_(True)
        out = m(x, inputs["y"], inputs["zs"], path_type=path_type, align_only=align_only,
                time_input=inputs["time_input"], noises=inputs["noises"])
        loss = out["proj_loss"] if align_only else out["denoising_loss"].mean() + 0.5 * out["proj_loss"]
        loss.backward()
        records[name] = {**{k: (v.detach() if torch.is_tensor(v) else v) for k, v in out.items() if k != "zs_tilde"},
                         "zs_tilde": [z.detach() for z in out["zs_tilde"]], "loss": loss.detach(), "grad_x": x.grad,
                         "mode": mode, "path_type": path_type, "align_only": align_only, "label_dropout_prob_used": 0.0,
                         "bn_after": {k: getattr(m.bn, k).clone() for k in ("running_mean", "running_var", "num_batches_tracked")}}
        if not align_only:
            records[name]["grads"] = {n: p.grad.clone() for n, p in m.named_parameters()}
        configs[name] = {"mode": mode, "path_type": path_type, "align_only": align_only}
    m = copy.deepcopy(model).train()
    labels = []
    hook = m.y_embedder.embedding_table.register_forward_pre_hook(lambda _m, a: labels.append(a[0]))
    torch.manual_seed(7)
    with torch.no_grad():
        out = m(inputs["x"], inputs["y"], inputs["zs"], path_type="cosine", weighting="lognormal")
    hook.remove()
    sampled = {"train_lognormal_cosine": {**{k: v for k, v in out.items()}, "mode": "train", "weighting": "lognormal",
                                          "path_type": "cosine", "seed": 7, "label_dropout_prob_used": 0.2,
                                          "effective_labels": labels[0],
                                          "bn_after": {k: getattr(m.bn, k).clone() for k in ("running_mean", "running_var", "num_batches_tracked")}}}
    with torch.no_grad():
        inference = copy.deepcopy(model).eval().inference(inputs["inference"]["x"], inputs["inference"]["t"], inputs["inference"]["y"])
    return {
        "meta": {"fixture": "sit_forward", "format_version": 1},
        "config": {"kwargs": kwargs, "proj_coeff_for_grads": 0.5, "records": configs},
        "state_dict": model.state_dict(), "inputs": inputs,
        "outputs": {"records": records, "sampled_records": sampled, "inference": inference},
    }


def make_dinov2_fixture():
    gen = torch.Generator().manual_seed(1)
    kwargs = dict(img_size=518, patch_size=14, embed_dim=48, depth=1, num_heads=4, mlp_ratio=4,
                  ffn_layer="swiglufused", num_register_tokens=4)
    hub = DinoVisionTransformer(48, 1, 4, "swiglu", 14, 4, grid=37)
    randomize(hub, gen)
    resampled = DinoVisionTransformer(48, 1, 4, "swiglu", 14, 4, grid=32)
    from repa_e_fast.models.encoders import load_dinov2_state_dict

    load_dinov2_state_dict(resampled, hub.state_dict(), "hub")
    raw = torch.randint(0, 256, (1, 3, 512, 512), dtype=torch.uint8, generator=gen)
    pre = preprocess_raw_image(raw, "dinov2reg", 512)
    with torch.no_grad():
        features = resampled.eval().forward_features(pre)
    return {
        "meta": {"fixture": "dinov2_encoder", "format_version": 1},
        "config": {"kwargs": kwargs, "enc_type": "dinov2reg-vit-b", "resolution": 512},
        "raw_state_dict": hub.state_dict(), "state_dict": resampled.state_dict(), "inputs": {"raw_uint8": raw},
        "outputs": {"preprocessed": pre, "resampled_pos_embed": resampled.pos_embed.detach().clone(), **features},
    }


def make_vae_fixture():
    gen = torch.Generator().manual_seed(2)
    config = {"tiny": {"embed_dim": 4, "ch_mult": [1, 2], "ch": 32, "num_res_blocks": 1, "attn_resolutions": [8],
                       "resolution": 16}}
    vae = AutoencoderKL(embed_dim=4, ch_mult=(1, 2), ch=32, num_res_blocks=1, attn_resolutions=(8,), resolution=16)
    randomize(vae, gen, std=0.1)
    raw = torch.randint(0, 256, (2, 3, 16, 16), dtype=torch.uint8, generator=gen)
    images = (raw.float() / 127.5 - 1).requires_grad_(True)
    posterior = vae.encode(images)
    decoded = vae.decode(posterior.mean).sample
    scalar = decoded.square().mean() + posterior.kl().mean() * 1e-3
    scalar.backward()
    torch.manual_seed(3)
    with torch.no_grad():
        _, z, recon = vae(images.detach())
    record = {"moments": posterior.parameters.detach(), "kl": posterior.kl().detach(), "decoded_mean": decoded.detach(),
              "scalar": scalar.detach(), "grad_images": images.grad, "grads": {n: p.grad for n, p in vae.named_parameters()},
              "forward_sample": {"seed": 3, "z": z, "recon": recon, "eps": (z - posterior.mean.detach()) / posterior.std.detach()}}
    return {"meta": {"fixture": "vae_forward", "format_version": 1}, "config": config,
            "state_dict": {"tiny": vae.state_dict()}, "inputs": {"raw_uint8": raw, "images": images.detach()},
            "outputs": {"tiny": record}}


MAKERS = {"sit": make_sit_fixture, "dinov2": make_dinov2_fixture, "vae": make_vae_fixture}


@pytest.mark.parametrize("kind", sorted(MAKERS))
def test_parity_passes_on_other_configs_and_fails_when_perturbed(kind, tmp_path, capsys):
    data = MAKERS[kind]()
    good = tmp_path / "good.pt"
    torch.save(data, good)
    assert parity.main([str(good)]) == 0
    printed = capsys.readouterr().out
    assert "FAIL" not in printed and printed.count("PASS") >= 10

    bad = copy.deepcopy(data)
    if kind == "sit":
        bad["outputs"]["records"]["train_cosine"]["zs_tilde"][1][0, 0, 0] += 1e-3
    elif kind == "dinov2":
        bad["outputs"]["x_norm_patchtokens"][0, -1, 0] += 1e-3  # the last of 1024 tokens at 512 px
    else:
        bad["outputs"]["tiny"]["grads"]["decoder.conv_out.bias"][0] *= 1.01
    torch.save(bad, tmp_path / "bad.pt")
    assert parity.main([str(tmp_path / "bad.pt")]) == 1
    assert "FAIL" in capsys.readouterr().out


def test_unknown_kind_and_unreadable_file_exit_2(tmp_path, capsys):
    torch.save({"meta": {"fixture": "something_else"}}, tmp_path / "x.pt")
    (tmp_path / "broken.pt").write_bytes(b"not a zip")
    assert parity.main([str(tmp_path / "x.pt")]) == 2
    assert parity.main([str(tmp_path / "broken.pt")]) == 2
    assert "unknown fixture kind" in capsys.readouterr().out
