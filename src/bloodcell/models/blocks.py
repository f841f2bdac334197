"""Building blocks shared by the model families: the paper's Keras-style conv block and attention modules.

The paper's "SE" block is CBAM-style channel attention with *separate* MLPs for the average- and
max-pooled descriptors (``ChannelAttention``); the classic squeeze-excitation of Hu et al. is
``SqueezeExcite``. Both are here so they can be compared under their own names.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

# Keras BatchNormalization defaults: momentum 0.99 (PyTorch's 0.01) and epsilon 1e-3.
KERAS_BN = {"momentum": 0.01, "eps": 1e-3}


def keras_init_(module: nn.Module) -> nn.Module:
    """Glorot-uniform weights and zero biases for every conv/dense layer, as Keras initialises them."""
    for m in module.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear, nn.ConvTranspose2d)):
            nn.init.xavier_uniform_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
    return module


class ConvBNReLU(nn.Sequential):
    """Conv 3x3 'same' with bias -> BatchNorm (Keras defaults) -> ReLU: the paper's conv block."""

    def __init__(self, in_ch: int, out_ch: int, kernel_size: int = 3, batch_norm: bool = True,
                 bn_momentum: float = KERAS_BN["momentum"]):
        layers: list[nn.Module] = [nn.Conv2d(in_ch, out_ch, kernel_size, padding=kernel_size // 2, bias=True)]
        if batch_norm:
            layers.append(nn.BatchNorm2d(out_ch, momentum=bn_momentum, eps=KERAS_BN["eps"]))
        layers.append(nn.ReLU(inplace=True))
        super().__init__(*layers)


def pad_same(x: torch.Tensor, kernel: tuple[int, int], stride: tuple[int, int], value: float = 0.0) -> torch.Tensor:
    """Pad as TensorFlow's ``padding='same'`` does: output ceil(n / stride), the odd pixel on the right/bottom."""
    pads = []
    for n, k, s in zip(reversed(x.shape[2:]), reversed(kernel), reversed(stride)):
        total = max((math.ceil(n / s) - 1) * s + k - n, 0)
        pads += [total // 2, total - total // 2]
    return F.pad(x, pads, value=value) if any(pads) else x


class Conv2dSame(nn.Conv2d):
    """``nn.Conv2d`` with Keras ``padding='same'`` for any stride (PyTorch's ``'same'`` only allows stride 1)."""

    def __init__(self, in_ch: int, out_ch: int, kernel_size: int | tuple[int, int], stride: int = 1, bias: bool = True):
        super().__init__(in_ch, out_ch, kernel_size, stride=stride, padding=0, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(pad_same(x, self.kernel_size, self.stride))


class MaxPool2dSame(nn.Module):
    """Keras ``MaxPooling2D(k, strides=s, padding='same')``: pads with -inf so padding never wins."""

    def __init__(self, kernel_size: int, stride: int):
        super().__init__()
        self.kernel_size, self.stride = (kernel_size, kernel_size), (stride, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.max_pool2d(pad_same(x, self.kernel_size, self.stride, float("-inf")), self.kernel_size, self.stride)


class ConvBNAct(nn.Sequential):
    """Keras-'same' conv with bias -> BatchNorm (Keras defaults) -> activation; any kernel shape and stride."""

    def __init__(self, in_ch: int, out_ch: int, kernel_size: int | tuple[int, int] = 3, stride: int = 1,
                 act: type[nn.Module] = nn.ReLU, bn_momentum: float = KERAS_BN["momentum"]):
        super().__init__(
            Conv2dSame(in_ch, out_ch, kernel_size, stride),
            nn.BatchNorm2d(out_ch, momentum=bn_momentum, eps=KERAS_BN["eps"]),
            act(inplace=True),
        )


class MaxPoolSame(nn.Module):
    """Keras ``MaxPooling2D(2, strides=1, padding='same')``: pads right and bottom, keeps the size."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.max_pool2d(F.pad(x, (0, 1, 0, 1), value=float("-inf")), 2, stride=1)


class ChannelAttention(nn.Module):
    """The paper's channel attention: sigmoid(MLP_avg(avgpool x) + MLP_max(maxpool x)) * x.

    Unlike CBAM's shared MLP, the two descriptors get their own bias-free MLPs (C -> C/r -> C),
    so a block has C^2/2 parameters at r=8.
    """

    def __init__(self, channels: int, ratio: int = 8):
        super().__init__()
        hidden = max(1, channels // ratio)
        self.mlp_avg = nn.Sequential(
            nn.Linear(channels, hidden, bias=False), nn.ReLU(inplace=True), nn.Linear(hidden, channels, bias=False)
        )
        self.mlp_max = nn.Sequential(
            nn.Linear(channels, hidden, bias=False), nn.ReLU(inplace=True), nn.Linear(hidden, channels, bias=False)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        avg = self.mlp_avg(x.mean(dim=(2, 3)))
        mx = self.mlp_max(x.amax(dim=(2, 3)))
        return x * torch.sigmoid(avg + mx)[:, :, None, None]


class SpatialAttention(nn.Module):
    """sigmoid(conv7x7([mean_c x, max_c x])) * x, no bias, no BatchNorm: 98 parameters."""

    def __init__(self, kernel_size: int = 7):
        super().__init__()
        self.conv = nn.Conv2d(2, 1, kernel_size, padding=kernel_size // 2, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        desc = torch.cat([x.mean(dim=1, keepdim=True), x.amax(dim=1, keepdim=True)], dim=1)
        return x * torch.sigmoid(self.conv(desc))


class CBAM(nn.Module):
    """Channel attention, then spatial attention (Woo et al. 2018, with the paper's channel block)."""

    def __init__(self, channels: int, ratio: int = 8, kernel_size: int = 7):
        super().__init__()
        self.channel = ChannelAttention(channels, ratio)
        self.spatial = SpatialAttention(kernel_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.spatial(self.channel(x))


class SqueezeExcite(nn.Module):
    """Classic squeeze-excitation (Hu et al. 2018, timm-style): avgpool -> FC(C/r)+ReLU -> FC(C) -> sigmoid."""

    def __init__(self, channels: int, ratio: int = 16):
        super().__init__()
        hidden = max(1, channels // ratio)
        self.fc1 = nn.Conv2d(channels, hidden, 1, bias=True)
        self.act = nn.ReLU(inplace=True)
        self.fc2 = nn.Conv2d(hidden, channels, 1, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = x.mean(dim=(2, 3), keepdim=True)
        return x * torch.sigmoid(self.fc2(self.act(self.fc1(s))))


ATTENTION = {
    "none": None,
    "se": ChannelAttention,
    "sa": lambda channels: SpatialAttention(),
    "cbam": CBAM,
    "se-classic": SqueezeExcite,
}


def make_attention(kind: str, channels: int) -> nn.Module:
    """An attention module by name (``se``, ``sa``, ``cbam``, ``se-classic``), or identity for ``none``."""
    if kind not in ATTENTION:
        raise ValueError(f"unknown attention '{kind}' (known: {', '.join(ATTENTION)})")
    factory = ATTENTION[kind]
    return nn.Identity() if factory is None else factory(channels)
