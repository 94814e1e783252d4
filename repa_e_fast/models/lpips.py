"""LPIPS perceptual distance (VGG16 trunk + learned 1x1 "lin" heads), key-compatible with
the official module (manifest ``lpips.json``; docs/models.md#lpips).

Official quirk kept (docs/numerics.md#lpips-input-range): the module assumes inputs in [0, 1]
and maps them with 2x - 1, but REPA-E feeds [-1, 1] images, so the VGG trunk effectively
sees [-3, 1].
"""

import os
from typing import Dict, List, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from .fast_path import FastPath

# VGG16 ``features`` layer list: conv widths, "M" = 2x2 max-pool.
VGG16_FEATURES = [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512]
# LPIPS taps relu1_2, relu2_2, relu3_3, relu4_3, relu5_3: slice k covers features[start:end).
SLICE_BOUNDS = [(0, 4), (4, 9), (9, 16), (16, 23), (23, 30)]
TAP_CHANNELS = [64, 128, 256, 512, 512]


def vgg16_feature_layers() -> List[nn.Module]:
    layers: List[nn.Module] = []
    in_channels = 3
    for item in VGG16_FEATURES:
        if item == "M":
            layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
        else:
            layers += [nn.Conv2d(in_channels, item, kernel_size=3, padding=1), nn.ReLU(inplace=False)]
            in_channels = item
    return layers


class VGG16Slices(FastPath, nn.Module):
    """The VGG16 trunk split into five slices; children keep torchvision's ``features`` indices.
    Fast path: in-place ReLUs (the convolution outputs they overwrite are not saved for backward)."""

    def __init__(self):
        super().__init__()
        layers = vgg16_feature_layers()
        for number, (start, end) in enumerate(SLICE_BOUNDS, start=1):
            piece = nn.Sequential()
            for index in range(start, end):
                piece.add_module(str(index), layers[index])
            setattr(self, f"slice{number}", piece)

    def forward(self, x: torch.Tensor) -> List[torch.Tensor]:
        taps = []
        for number in range(1, 6):
            for layer in getattr(self, f"slice{number}"):
                x = F.relu(x, inplace=True) if self.fused_ops and isinstance(layer, nn.ReLU) else layer(x)
            taps.append(x)
        return taps


class ScalingLayer(nn.Module):
    def __init__(self):
        super().__init__()
        self.register_buffer("shift", torch.tensor([-0.030, -0.088, -0.188]).view(1, 3, 1, 1))
        self.register_buffer("scale", torch.tensor([0.458, 0.448, 0.450]).view(1, 3, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.shift) / self.scale


class NetLinLayer(nn.Module):
    """Dropout (index 0, inactive: LPIPS always runs in eval mode) + 1x1 conv to one channel."""

    def __init__(self, channels: int):
        super().__init__()
        self.model = nn.Sequential(nn.Dropout(), nn.Conv2d(channels, 1, kernel_size=1, bias=False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)


def normalize_channels(x: torch.Tensor, eps: float = 1e-10) -> torch.Tensor:
    """x / (||x||_2 over channels + eps): eps added to the norm, not under the root."""
    return x / (torch.sqrt(torch.sum(x * x, dim=1, keepdim=True)) + eps)


class _TapDistance(torch.autograd.Function):
    """Per image: mean over pixels of sum_c w_c (a_c - b_c)^2, a = f0 / (||f0|| + eps),
    b = f1 / (||f1|| + eps) (norms over channels). The reference builds the normalised
    features, their difference, its square and the 1x1 conv output as full-size tensors,
    each saved for backward; here only the per-pixel inverse norms are saved beside f0 and
    f1 (which the VGG's ReLUs save anyway) and the backward recomputes the rest."""

    @staticmethod
    def forward(ctx, f0, f1, weight, eps):
        if ctx.needs_input_grad[2]:
            raise RuntimeError("LPIPS lin weights are frozen; _TapDistance gives no gradient for them")
        w = weight.reshape(1, -1, 1, 1)
        s0 = torch.linalg.vector_norm(f0, dim=1, keepdim=True)
        s1 = torch.linalg.vector_norm(f1, dim=1, keepdim=True)
        diff = f0 / (s0 + eps) - f1 / (s1 + eps)
        ctx.save_for_backward(f0, f1, weight, s0, s1)
        ctx.eps = eps
        return (diff.square() * w).sum(dim=1, keepdim=True).mean(dim=(2, 3), keepdim=True)

    @staticmethod
    def backward(ctx, grad):
        f0, f1, weight, s0, s1 = ctx.saved_tensors
        r0, r1 = 1.0 / (s0 + ctx.eps), 1.0 / (s1 + ctx.eps)
        # dL/da = 2 w (a - b) grad / HW (= g; dL/db = -g). Through a = f r, r = 1 / (||f|| + eps):
        # df = r g - f r^2 <f, g> / ||f||  (0 where ||f|| = 0, where f itself is 0).
        g = (2.0 / (f0.shape[2] * f0.shape[3])) * grad * weight.reshape(1, -1, 1, 1) * (f0 * r0 - f1 * r1)

        def through_norm(f, s, r, g):
            dot = (f * g).sum(dim=1, keepdim=True)
            return r * g - f * (r * r * dot / s.clamp_min(torch.finfo(s.dtype).tiny))

        d0 = through_norm(f0, s0, r0, g) if ctx.needs_input_grad[0] else None
        d1 = through_norm(f1, s1, r1, -g) if ctx.needs_input_grad[1] else None
        return d0, d1, None, None


class LPIPS(FastPath, nn.Module):
    """Fast path (``fused_ops``; same math in fp32): real and fake through the VGG as one 2B
    batch, in-place ReLUs, and per tap one function for normalise, difference, lin weighting
    and spatial mean (``_TapDistance``). Off: the official module's op sequence."""

    def __init__(self):
        super().__init__()
        self.scaling_layer = ScalingLayer()
        self.net = VGG16Slices()
        for number, channels in enumerate(TAP_CHANNELS):
            setattr(self, f"lin{number}", NetLinLayer(channels))
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> "LPIPS":
        # The official perceptual module forces eval mode on every call; keep dropout off always.
        return super().train(False)

    def forward(self, input: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Distance per image, [N, 1, 1, 1]. Inputs are mapped with 2x - 1 first
        (docs/numerics.md#lpips-input-range)."""
        if self.fused_ops:
            return self._fast_forward(input, target)
        taps0 = self.net(self.scaling_layer(2 * input - 1))
        taps1 = self.net(self.scaling_layer(2 * target - 1))
        total = 0
        for number, (f0, f1) in enumerate(zip(taps0, taps1)):
            diff = (normalize_channels(f0) - normalize_channels(f1)) ** 2
            total = total + getattr(self, f"lin{number}")(diff).mean(dim=[2, 3], keepdim=True)
        return total

    def _fast_forward(self, input: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        batch = input.shape[0]
        taps = self.net(self.scaling_layer(2 * torch.cat([input, target]) - 1))
        total = 0
        for number, tap in enumerate(taps):
            weight = getattr(self, f"lin{number}").model[1].weight
            total = total + _TapDistance.apply(tap[:batch], tap[batch:], weight, 1e-10)
        return total

    @classmethod
    def from_files(cls, vgg16_path: str, lin_path: str) -> "LPIPS":
        """Build from local files: torchvision's ``vgg16-397923af.pth`` (keys ``features.N.*``)
        and the LPIPS lin weights ``vgg.pth`` (keys ``linK.model.1.weight``)."""
        from .checkpoints import load_state_dict_file, load_state_dict_strict

        for path, what in ((vgg16_path, "torchvision VGG16 ImageNet weights"), (lin_path, "LPIPS lin weights vgg.pth")):
            if not os.path.isfile(path):
                raise FileNotFoundError(f"{what} not found: {path}")
        model = cls()
        state = {k: v for k, v in model.state_dict().items() if k.startswith("scaling_layer.")}
        state.update(vgg16_to_lpips_keys(load_state_dict_file(vgg16_path)))
        state.update({k: v for k, v in load_state_dict_file(lin_path).items() if k.startswith("lin")})
        load_state_dict_strict(model, state, f"LPIPS (from {vgg16_path} + {lin_path})")
        return model


def vgg16_to_lpips_keys(vgg_state: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """torchvision ``features.N.*`` -> ``net.sliceK.N.*``; the classifier is dropped."""
    converted = {}
    for key, value in vgg_state.items():
        if not key.startswith("features."):
            continue
        index = int(key.split(".")[1])
        number = next(n for n, (start, end) in enumerate(SLICE_BOUNDS, start=1) if start <= index < end)
        converted[f"net.slice{number}.{key[len('features.'):]}"] = value
    return converted


def build_lpips(path: Optional[str] = None) -> LPIPS:
    """An LPIPS module, loaded strictly from a full LPIPS state dict file when ``path`` is given."""
    model = LPIPS()
    if path is not None:
        from .checkpoints import load_weights

        load_weights(model, path, name="LPIPS")
    return model
