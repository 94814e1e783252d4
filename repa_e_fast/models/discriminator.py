"""PatchGAN discriminator (``NLayerDiscriminator``, n_layers=3, ndf=64, BatchNorm), key-compatible
with the official ``*-discriminator-ckpt.pt`` files (manifest ``discriminator.json``;
docs/models.md#patchgan-discriminator).

REPA-E never puts it in eval mode: its BatchNorms always use batch statistics
(docs/numerics.md#the-discriminator-stays-in-train-mode).
"""

import torch
import torch.nn as nn


class NLayerDiscriminator(nn.Module):
    def __init__(self, input_nc: int = 3, ndf: int = 64, n_layers: int = 3):
        super().__init__()
        layers = [nn.Conv2d(input_nc, ndf, kernel_size=4, stride=2, padding=1), nn.LeakyReLU(0.2, True)]
        mult = 1
        for n in range(1, n_layers):
            previous, mult = mult, min(2**n, 8)
            layers += [
                nn.Conv2d(ndf * previous, ndf * mult, kernel_size=4, stride=2, padding=1, bias=False),
                nn.BatchNorm2d(ndf * mult),
                nn.LeakyReLU(0.2, True),
            ]
        previous, mult = mult, min(2**n_layers, 8)
        layers += [
            nn.Conv2d(ndf * previous, ndf * mult, kernel_size=4, stride=1, padding=1, bias=False),
            nn.BatchNorm2d(ndf * mult),
            nn.LeakyReLU(0.2, True),
            nn.Conv2d(ndf * mult, 1, kernel_size=4, stride=1, padding=1),
        ]
        self.main = nn.Sequential(*layers)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Official init: conv weights N(0, 0.02^2) (conv biases keep PyTorch's default),
        BatchNorm weight N(1, 0.02^2), bias 0."""
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.normal_(module.weight, 0.0, 0.02)
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.normal_(module.weight, 1.0, 0.02)
                nn.init.zeros_(module.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.main(x)
