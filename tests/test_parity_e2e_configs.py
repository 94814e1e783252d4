"""The e2e_step and vae_loss parity checkers handle configurations the shipped fixtures do
not cover: cosine path, lognormal times given explicitly, two encoders, patch size 1, an
f16d32-style VAE, LeCam on. Outputs are produced by our own step (the checkers' generality
is what is tested; numerical parity is the shipped fixtures' job), then one number is
perturbed and the check must fail."""

import copy

import torch

from repa_e_fast import parity
from repa_e_fast.losses.vae_loss import VAELossConfig, VAERegularizationLoss
from repa_e_fast.models.sit import SiT
from repa_e_fast.models.vae import AutoencoderKL

LOSS_CONFIG = {"model": {"vq_model": {"quantize_mode": "vae"}},
               "losses": {"discriminator_start": 0, "discriminator_factor": 1.0, "discriminator_weight": 0.1,
                          "quantizer_weight": 1.0, "perceptual_loss": "lpips", "perceptual_weight": 1.0,
                          "reconstruction_loss": "l1", "reconstruction_weight": 1.0,
                          "lecam_regularization_weight": 0.001, "kl_weight": 1e-6, "logvar_init": 0.0}}


def make_e2e_fixture():
    torch.manual_seed(0)
    sit_kwargs = dict(depth=2, hidden_size=32, decoder_hidden_size=32, patch_size=1, num_heads=2, input_size=2,
                      in_channels=8, z_dims=[8, 12], encoder_depth=1, projector_dim=16, mlp_ratio=2.0,
                      qk_norm=False, fused_attn=True, class_dropout_prob=0.1, num_classes=5, bn_momentum=0.1)
    vae_config = {"embed_dim": 8, "ch_mult": [1, 1, 2, 2, 4], "ch": 32, "num_res_blocks": 1,
                  "attn_resolutions": [16], "resolution": 256}
    sit, ema = SiT(**sit_kwargs), SiT(**sit_kwargs)
    vae = AutoencoderKL(embed_dim=8, ch_mult=(1, 1, 2, 2, 4), ch=32, num_res_blocks=1)
    loss_module = VAERegularizationLoss(VAELossConfig.from_official(LOSS_CONFIG))
    with torch.no_grad():
        for module in (sit, ema):
            for p in module.parameters():
                p.add_(torch.randn_like(p) * 0.05)
    gen = torch.Generator().manual_seed(5)
    data = {
        "meta": {"fixture": "e2e_step", "format_version": 1},
        "config": {"sit": {"kwargs": sit_kwargs}, "vae": vae_config, "loss_config": LOSS_CONFIG, "rng_seed": 11,
                   "label_dropout": "disabled (dropout_prob set to 0)", "time_mode": "explicit",
                   "hparams": {"path_type": "cosine", "prediction": "v", "weighting": "lognormal", "proj_coeff": 0.5,
                               "vae_align_proj_coeff": 1.5, "learning_rate": 1e-4, "vae_learning_rate": 2e-4,
                               "disc_learning_rate": 1e-4, "adam_beta1": 0.9, "adam_beta2": 0.999,
                               "adam_weight_decay": 0.0, "adam_epsilon": 1e-8, "max_grad_norm": 1.0,
                               "ema_decay": 0.999, "global_step": 0, "lecam_regularization_weight": 0.001}},
        "state_dicts": {"sit": sit.state_dict(), "ema": ema.state_dict(), "vae": vae.state_dict(),
                        "loss_module": {k: v for k, v in loss_module.state_dict().items() if "ema_" not in k}},
        "inputs": {"raw_image": torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8, generator=gen),
                   "labels": torch.tensor([4, 1]), "global_step": 0,
                   "zs": [torch.randn(2, 4, 8, generator=gen), torch.randn(2, 4, 12, generator=gen)],
                   "explicit_time_input": torch.tensor([0.3, 0.8]).view(2, 1, 1, 1),
                   "explicit_noises": torch.randn(2, 8, 2, 2, generator=gen)},
    }
    step, (sit, ema, vae, loss_fn, optimizers) = parity.build_e2e_step(copy.deepcopy(data))
    torch.manual_seed(data["config"]["rng_seed"])
    inputs = data["inputs"]
    logs, inter = parity.step_by_phase(step, inputs["raw_image"], inputs["labels"], 0, inputs["zs"],
                                       time_input=inputs["explicit_time_input"], noises=inputs["explicit_noises"])
    data["outputs"] = {
        "logs": {k: v.item() for k, v in logs.items()},
        "intermediate": {k: inter[k] for k in ("z", "recon_image", "moments", "sit_grads_before_clip", "vae_loss_dict")},
        "state_dicts_after": {"sit": sit.state_dict(), "ema": ema.state_dict(), "vae": vae.state_dict(),
                              "discriminator": loss_fn.discriminator.state_dict(),
                              "loss_module_lecam_buffers": {"ema_real_logits_mean": loss_fn.ema_real_logits_mean.clone(),
                                                            "ema_fake_logits_mean": loss_fn.ema_fake_logits_mean.clone()}},
        "sit_bn_after": {k: getattr(sit.bn, k).clone() for k in ("running_mean", "running_var", "num_batches_tracked")},
        "sit_optimizer_state_after": optimizers["sit"].state_dict()["state"],
    }
    return data


def test_e2e_checker_on_other_configs(tmp_path, capsys):
    data = make_e2e_fixture()
    assert data["outputs"]["logs"]["lecam_loss"] > 0
    torch.save(data, tmp_path / "good.pt")
    assert parity.main([str(tmp_path / "good.pt")]) == 0
    printed = capsys.readouterr().out
    assert printed.count("PASS") >= 30 and "lecam_buffers" in printed

    for mutate in (lambda d: d["outputs"]["logs"].__setitem__("vae_align_loss", d["outputs"]["logs"]["vae_align_loss"] + 1e-3),
                   lambda d: d["outputs"]["state_dicts_after"]["ema"]["blocks.1.mlp.fc2.bias"].add_(1e-4),
                   lambda d: d["outputs"]["intermediate"]["sit_grads_before_clip"]["projectors.1.4.weight"].mul_(1.001)):
        bad = copy.deepcopy(data)
        mutate(bad)
        torch.save(bad, tmp_path / "bad.pt")
        assert parity.main([str(tmp_path / "bad.pt")]) == 1
        assert "FAIL" in capsys.readouterr().out
