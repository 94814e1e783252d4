"""Fused paths of the models against their reference paths, on the GPU at paper shapes.

    python benchmarks/check_models_gpu.py [--out FILE.json]
    python benchmarks/check_models_gpu.py --smoke     # tiny models, CPU, Triton interpreter

SiT-XL/2 (B=8, 32x32x4 latents, two encoders) and the f8d4 VAE (B=4, 256 px), random
weights, fp32 with TF32 off: forward outputs, losses and every parameter gradient of the
fused path (Triton kernels, channels_last VAE) compared with the reference path. Prints
max errors relative to each tensor's scale; exits 1 if any exceeds 1e-4.
"""

import argparse
import copy
import datetime
import json
import os
import sys

import torch

from repa_e_fast.models.sit import build_sit
from repa_e_fast.models.vae import AutoencoderKL, build_vae


def relative_error(a, b):
    return ((a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(1e-12)).item()


def worst_grad(reference, fused):
    pairs = [(n, a.grad, b.grad) for (n, a), b in zip(reference.named_parameters(), fused.parameters())
             if a.grad is not None]
    scale = max(g.abs().max().item() for _, g, _ in pairs)
    errors = [((g2.float() - g.float()).abs().max().item() / scale, n) for n, g, g2 in pairs]
    return max(errors), len(pairs)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out")
    parser.add_argument("--smoke", action="store_true", help="tiny models on the CPU (kernels interpreted)")
    args = parser.parse_args()
    if args.smoke:
        os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported (by the first kernel call)
        os.environ.pop("REPA_E_FAST_OPS", None)
    elif not torch.cuda.is_available():
        print("check_models_gpu.py: no CUDA device (use --smoke on a CPU)", file=sys.stderr)
        return 2
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    device = torch.device("cpu" if args.smoke else "cuda")
    batch, vae_batch, side = (2, 1, 4) if args.smoke else (8, 4, 32)
    rows = {}

    torch.manual_seed(0)
    if args.smoke:
        sit = build_sit("SiT-S/2", input_size=side, in_channels=4, depth=2, hidden_size=64, num_heads=2,
                        num_classes=1000, z_dims=[96, 128], encoder_depth=1, projector_dim=64,
                        class_dropout_prob=0.0).to(device)
    else:
        sit = build_sit("SiT-XL/2", input_size=side, in_channels=4, z_dims=[768, 1024], encoder_depth=8,
                        class_dropout_prob=0.0).to(device)
    with torch.no_grad():
        for p in sit.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    sit.pos_embed.requires_grad_(True)
    fused = copy.deepcopy(sit).set_fused_ops(True)
    tokens = (side // 2) ** 2
    x = torch.randn(batch, 4, side, side, device=device)
    y = torch.randint(0, 1000, (batch,), device=device)
    zs = [torch.randn(batch, tokens, dim, device=device) for dim in sit.z_dims]
    t, noise = torch.rand(batch, 1, 1, 1, device=device), torch.randn(batch, 4, side, side, device=device)
    outs = []
    for model in (sit, fused):
        model.train()
        out = model(x, y, zs, time_input=t, noises=noise)
        (out["denoising_loss"].mean() + 0.5 * out["proj_loss"]).backward()
        outs.append(out)
    (grad_err, grad_name), count = worst_grad(sit, fused)
    rows["sit_xl2"] = {"model_output_rel": relative_error(outs[1]["model_output"], outs[0]["model_output"]),
                       "proj_loss_abs": (outs[1]["proj_loss"] - outs[0]["proj_loss"]).abs().item(),
                       "grads_rel_worst": grad_err, "grads_worst": grad_name, "grads_compared": count}

    torch.manual_seed(1)
    if args.smoke:
        vae = AutoencoderKL(embed_dim=4, ch_mult=(1, 2), ch=32, num_res_blocks=1, resolution=16,
                            attn_resolutions=(8,)).to(device)
    else:
        vae = build_vae("f8d4").to(device)
    fused_vae = copy.deepcopy(vae).set_fused_ops(True).to(memory_format=torch.channels_last)
    resolution = 16 if args.smoke else 256
    images = torch.rand(vae_batch, 3, resolution, resolution, device=device) * 2 - 1
    results = []
    for model, memory_format in ((vae, torch.contiguous_format), (fused_vae, torch.channels_last)):
        posterior = model.encode(images.contiguous(memory_format=memory_format))
        decoded = model.decode(posterior.mean).sample
        (decoded.square().mean() + posterior.kl().mean() * 1e-3).backward()
        results.append((posterior.parameters, decoded))
    (grad_err, grad_name), count = worst_grad(vae, fused_vae)
    rows["vae_f8d4"] = {"moments_rel": relative_error(results[1][0], results[0][0]),
                        "decoded_rel": relative_error(results[1][1], results[0][1]),
                        "grads_rel_worst": grad_err, "grads_worst": grad_name, "grads_compared": count}
    report = {"device": "cpu (smoke)" if args.smoke else torch.cuda.get_device_name(), "torch": torch.__version__,
              "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "command": " ".join(["python", "benchmarks/check_models_gpu.py"] + sys.argv[1:]), "results": rows}
    print(json.dumps(report, indent=1))
    if args.out:
        with open(args.out, "w") as handle:
            json.dump(report, handle, indent=1)
    bad = [k for k, r in rows.items() for key, v in r.items() if key.endswith(("rel", "rel_worst")) and v > 1e-4]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
