"""InceptionV3 as the FID / ADM evaluator uses it, in plain PyTorch (no torchvision).

The network is TensorFlow's 2015-12-05 Inception graph (``classify_image_graph_def.pb``), the
one behind FID and OpenAI's ADM evaluation suite. Its weights are read from the widely used
PyTorch port ``pt_inception-2015-12-05-6726825d.pth`` (pytorch-fid's release file): module
names follow torchvision's ``Inception3`` (``Conv2d_1a_3x3.conv.weight``, ``Mixed_5b...``,
``fc`` with 1008 outputs), and the blocks carry the graph's quirks that the port documents:
average pools ignore padding (``count_include_pad=False``, TensorFlow's 'SAME' pooling) and
the last block (``Mixed_7c``) max-pools its pooling branch.

Inputs are prepared as the ADM evaluator feeds the graph: float images in [0, 255], resized
to 299x299 with TensorFlow 1's legacy bilinear resize (no half-pixel offset), then mapped to
[-1, 1) by ``(x - 128) / 128`` (the graph's own Sub/Mul nodes).

Outputs (``InceptionV3.forward``):
- ``pool``: the 2048-d ``pool_3`` features (FID, precision / recall);
- ``spatial``: the first 7 channels of ``mixed_6/conv`` (= ``Mixed_6d.branch1x1``, after its
  ReLU) at 17x17, flattened in TensorFlow's (row, column, channel) order: 2023-d (sFID);
- ``logits``: ``pool @ fc.weight.T`` WITHOUT the bias, as the ADM evaluator computes the
  softmax for the Inception Score (it multiplies ``pool_3`` by the graph's weight matrix only).
"""

import os
from typing import Dict, List, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

INCEPTION_WEIGHTS_NAME = "pt_inception-2015-12-05-6726825d.pth"
DEFAULT_INCEPTION_PATH = os.path.join("pretrained", INCEPTION_WEIGHTS_NAME)
INCEPTION_WEIGHTS_SOURCE = (
    "https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/" + INCEPTION_WEIGHTS_NAME
)
INPUT_SIZE = 299
SPATIAL_CHANNELS = 7  # the ADM evaluator keeps mixed_6/conv[..., :7]


class BasicConv2d(nn.Module):
    """conv (no bias) -> BatchNorm (eps 1e-3, the port's value) -> ReLU."""

    def __init__(self, in_channels: int, out_channels: int, **conv_kwargs):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, bias=False, **conv_kwargs)
        self.bn = nn.BatchNorm2d(out_channels, eps=0.001)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.bn(self.conv(x)))


def tf_avg_pool_3x3(x: torch.Tensor) -> torch.Tensor:
    # TensorFlow 'SAME' average pooling divides by the number of real (unpadded) inputs.
    return F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False)


class InceptionA(nn.Module):
    """35x35 block (Mixed_5b/5c/5d)."""

    def __init__(self, in_channels: int, pool_features: int):
        super().__init__()
        self.branch1x1 = BasicConv2d(in_channels, 64, kernel_size=1)
        self.branch5x5_1 = BasicConv2d(in_channels, 48, kernel_size=1)
        self.branch5x5_2 = BasicConv2d(48, 64, kernel_size=5, padding=2)
        self.branch3x3dbl_1 = BasicConv2d(in_channels, 64, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, kernel_size=3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, kernel_size=3, padding=1)
        self.branch_pool = BasicConv2d(in_channels, pool_features, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        branch5x5 = self.branch5x5_2(self.branch5x5_1(x))
        branch3x3dbl = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        branch_pool = self.branch_pool(tf_avg_pool_3x3(x))
        return torch.cat([self.branch1x1(x), branch5x5, branch3x3dbl, branch_pool], 1)


class InceptionB(nn.Module):
    """Grid reduction 35 -> 17 (Mixed_6a)."""

    def __init__(self, in_channels: int):
        super().__init__()
        self.branch3x3 = BasicConv2d(in_channels, 384, kernel_size=3, stride=2)
        self.branch3x3dbl_1 = BasicConv2d(in_channels, 64, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, kernel_size=3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, kernel_size=3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        branch3x3dbl = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        branch_pool = F.max_pool2d(x, kernel_size=3, stride=2)
        return torch.cat([self.branch3x3(x), branch3x3dbl, branch_pool], 1)


class InceptionC(nn.Module):
    """17x17 block with factorised 7x7 convolutions (Mixed_6b..6e)."""

    def __init__(self, in_channels: int, channels_7x7: int):
        super().__init__()
        c7 = channels_7x7
        self.branch1x1 = BasicConv2d(in_channels, 192, kernel_size=1)
        self.branch7x7_1 = BasicConv2d(in_channels, c7, kernel_size=1)
        self.branch7x7_2 = BasicConv2d(c7, c7, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7_3 = BasicConv2d(c7, 192, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_1 = BasicConv2d(in_channels, c7, kernel_size=1)
        self.branch7x7dbl_2 = BasicConv2d(c7, c7, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_3 = BasicConv2d(c7, c7, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7dbl_4 = BasicConv2d(c7, c7, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_5 = BasicConv2d(c7, 192, kernel_size=(1, 7), padding=(0, 3))
        self.branch_pool = BasicConv2d(in_channels, 192, kernel_size=1)

    def branches(self, x: torch.Tensor) -> List[torch.Tensor]:
        """The four branch outputs; the first (branch1x1) of Mixed_6d is TF's mixed_6/conv."""
        branch7x7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        branch7x7dbl = x
        for layer in (self.branch7x7dbl_1, self.branch7x7dbl_2, self.branch7x7dbl_3,
                      self.branch7x7dbl_4, self.branch7x7dbl_5):
            branch7x7dbl = layer(branch7x7dbl)
        branch_pool = self.branch_pool(tf_avg_pool_3x3(x))
        return [self.branch1x1(x), branch7x7, branch7x7dbl, branch_pool]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat(self.branches(x), 1)


class InceptionD(nn.Module):
    """Grid reduction 17 -> 8 (Mixed_7a)."""

    def __init__(self, in_channels: int):
        super().__init__()
        self.branch3x3_1 = BasicConv2d(in_channels, 192, kernel_size=1)
        self.branch3x3_2 = BasicConv2d(192, 320, kernel_size=3, stride=2)
        self.branch7x7x3_1 = BasicConv2d(in_channels, 192, kernel_size=1)
        self.branch7x7x3_2 = BasicConv2d(192, 192, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7x3_3 = BasicConv2d(192, 192, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7x3_4 = BasicConv2d(192, 192, kernel_size=3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        branch3x3 = self.branch3x3_2(self.branch3x3_1(x))
        branch7x7x3 = self.branch7x7x3_4(self.branch7x7x3_3(self.branch7x7x3_2(self.branch7x7x3_1(x))))
        branch_pool = F.max_pool2d(x, kernel_size=3, stride=2)
        return torch.cat([branch3x3, branch7x7x3, branch_pool], 1)


class InceptionE(nn.Module):
    """8x8 block with expanded filter banks (Mixed_7b with average pooling, Mixed_7c with max
    pooling: the TF graph's last block max-pools, which the port reproduces)."""

    def __init__(self, in_channels: int, pooling: str):
        super().__init__()
        if pooling not in ("avg", "max"):
            raise ValueError(f"pooling must be 'avg' or 'max', got {pooling!r}")
        self.pooling = pooling
        self.branch1x1 = BasicConv2d(in_channels, 320, kernel_size=1)
        self.branch3x3_1 = BasicConv2d(in_channels, 384, kernel_size=1)
        self.branch3x3_2a = BasicConv2d(384, 384, kernel_size=(1, 3), padding=(0, 1))
        self.branch3x3_2b = BasicConv2d(384, 384, kernel_size=(3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = BasicConv2d(in_channels, 448, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(448, 384, kernel_size=3, padding=1)
        self.branch3x3dbl_3a = BasicConv2d(384, 384, kernel_size=(1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = BasicConv2d(384, 384, kernel_size=(3, 1), padding=(1, 0))
        self.branch_pool = BasicConv2d(in_channels, 192, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        branch3x3 = self.branch3x3_1(x)
        branch3x3 = torch.cat([self.branch3x3_2a(branch3x3), self.branch3x3_2b(branch3x3)], 1)
        branch3x3dbl = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        branch3x3dbl = torch.cat([self.branch3x3dbl_3a(branch3x3dbl), self.branch3x3dbl_3b(branch3x3dbl)], 1)
        if self.pooling == "avg":
            pooled = tf_avg_pool_3x3(x)
        else:
            pooled = F.max_pool2d(x, kernel_size=3, stride=1, padding=1)
        return torch.cat([self.branch1x1(x), branch3x3, branch3x3dbl, self.branch_pool(pooled)], 1)


def tf1_resize_bilinear(images: torch.Tensor, size: int) -> torch.Tensor:
    """TensorFlow 1 ``resize_bilinear`` (align_corners=False, no half-pixel centres) on NCHW.

    Output pixel ``i`` samples the input at ``i * in_size / out_size`` (PyTorch's
    ``align_corners=False`` would use ``(i + 0.5) * scale - 0.5``); the right/bottom
    neighbour is clamped to the border. This is the resize inside the Inception graph.
    """

    def axis_weights(in_size: int):
        scale = in_size / size
        source = torch.arange(size, dtype=torch.float64, device=images.device) * scale
        low = source.floor().long().clamp(max=in_size - 1)
        high = (low + 1).clamp(max=in_size - 1)
        frac = (source - low).to(images.dtype)
        return low, high, frac

    rows_low, rows_high, row_frac = axis_weights(images.shape[-2])
    cols_low, cols_high, col_frac = axis_weights(images.shape[-1])
    top = images[..., rows_low, :]
    bottom = images[..., rows_high, :]

    def horizontal(x: torch.Tensor) -> torch.Tensor:
        left, right = x[..., cols_low], x[..., cols_high]
        return left + (right - left) * col_frac

    top, bottom = horizontal(top), horizontal(bottom)
    return top + (bottom - top) * row_frac.view(-1, 1)


class InceptionV3(nn.Module):
    """The FID Inception network; ``forward`` maps float images in [0, 255] (NCHW, any size)
    to ``{"pool": [N,2048], "spatial": [N,2023], "logits": [N,1008]}`` (see module doc)."""

    def __init__(self):
        super().__init__()
        self.Conv2d_1a_3x3 = BasicConv2d(3, 32, kernel_size=3, stride=2)
        self.Conv2d_2a_3x3 = BasicConv2d(32, 32, kernel_size=3)
        self.Conv2d_2b_3x3 = BasicConv2d(32, 64, kernel_size=3, padding=1)
        self.Conv2d_3b_1x1 = BasicConv2d(64, 80, kernel_size=1)
        self.Conv2d_4a_3x3 = BasicConv2d(80, 192, kernel_size=3)
        self.Mixed_5b = InceptionA(192, pool_features=32)
        self.Mixed_5c = InceptionA(256, pool_features=64)
        self.Mixed_5d = InceptionA(288, pool_features=64)
        self.Mixed_6a = InceptionB(288)
        self.Mixed_6b = InceptionC(768, channels_7x7=128)
        self.Mixed_6c = InceptionC(768, channels_7x7=160)
        self.Mixed_6d = InceptionC(768, channels_7x7=160)
        self.Mixed_6e = InceptionC(768, channels_7x7=192)
        self.Mixed_7a = InceptionD(768)
        self.Mixed_7b = InceptionE(1280, pooling="avg")
        self.Mixed_7c = InceptionE(2048, pooling="max")
        self.fc = nn.Linear(2048, 1008)

    @staticmethod
    def prepare(images: torch.Tensor) -> torch.Tensor:
        """[0, 255] floats -> the graph's input: 299x299 TF1 bilinear, then (x - 128) / 128."""
        x = tf1_resize_bilinear(images, INPUT_SIZE)
        return (x - 128.0) / 128.0

    def forward(self, images: torch.Tensor) -> Dict[str, torch.Tensor]:
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"expected images [N, 3, H, W] in [0, 255], got shape {tuple(images.shape)}")
        x = self.prepare(images.float())
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
        x = F.max_pool2d(x, kernel_size=3, stride=2)
        x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x))
        x = F.max_pool2d(x, kernel_size=3, stride=2)
        x = self.Mixed_6a(self.Mixed_5d(self.Mixed_5c(self.Mixed_5b(x))))
        x = self.Mixed_6c(self.Mixed_6b(x))
        mixed_6d = self.Mixed_6d.branches(x)
        x = torch.cat(mixed_6d, 1)
        # TF's mixed_6/conv is NHWC: keep 7 channels, flatten as (row, column, channel).
        spatial = mixed_6d[0][:, :SPATIAL_CHANNELS].permute(0, 2, 3, 1).flatten(1)
        x = self.Mixed_7c(self.Mixed_7b(self.Mixed_7a(self.Mixed_6e(x))))
        pool = x.mean(dim=(2, 3))  # pool_3: 8x8 average, VALID
        logits = pool @ self.fc.weight.t()  # no bias: the ADM evaluator's softmax input
        return {"pool": pool, "spatial": spatial, "logits": logits}


def resolve_inception_path(path: Optional[str] = None) -> str:
    """The weights file to use: ``path`` if given, else ``pretrained/<name>``; a clear error
    if it is absent (nothing is downloaded)."""
    candidate = path or DEFAULT_INCEPTION_PATH
    if not os.path.isfile(candidate):
        raise FileNotFoundError(
            f"Inception weights not found: {candidate}. The metrics need {INCEPTION_WEIGHTS_NAME}, the "
            "PyTorch port of TensorFlow's 2015-12-05 Inception graph used by FID and the ADM evaluator "
            f"(released by pytorch-fid: {INCEPTION_WEIGHTS_SOURCE}). Download it yourself and pass "
            f"--inception PATH or place it at {DEFAULT_INCEPTION_PATH}; nothing is downloaded at run time."
        )
    return candidate


def load_inception(path: Optional[str] = None, device="cpu") -> InceptionV3:
    """Build the network and load the weights file strictly (eval mode, fp32, no grad).

    BatchNorm ``num_batches_tracked`` counters are not used in eval mode; files written
    without them (older PyTorch) are accepted, every other key must match exactly.
    """
    from ..models.checkpoints import load_state_dict_file, load_state_dict_strict

    path = resolve_inception_path(path)
    state_dict = load_state_dict_file(path)
    model = InceptionV3()
    for key, value in model.state_dict().items():
        if key.endswith("num_batches_tracked") and key not in state_dict:
            state_dict[key] = value
    load_state_dict_strict(model, state_dict, f"InceptionV3 (from {path})")
    return model.to(device).eval().requires_grad_(False)
