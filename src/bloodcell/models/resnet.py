"""The paper's ResNet34 (Table 3), as the authors' Keras code builds it: 21,323,016 Keras parameters.

ZeroPad 3 -> Conv 7x7 s2 'same' 64 (bias) -> BN -> ReLU -> MaxPool 3x3 s2 'same' -> basic blocks 3/4/6/3
(64/128/256/512) -> AvgPool 2x2 'same' -> Flatten -> Dense.

Where the count puts the projections: only the first block of stages 2-4 (where width and stride change) has
a shortcut, a 1x1 stride-2 conv with bias and *no* BatchNorm (stage 1 keeps identity shortcuts). The head is
not a global average pool: at 64x64 the last map is 3x3, and Keras ``AveragePooling2D(2, padding='same')``
leaves 2x2x512 = 2048 features for the dense layer. This is the only combination of the usual choices that
gives 21,323,016: a global pool would give 12,288 fewer, BN on the projections 3,584 more, a projection
in stage 1 too 4,160 more.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from bloodcell.models.blocks import KERAS_BN, Conv2dSame, MaxPool2dSame, keras_init_
from bloodcell.models.registry import feature_shape, register_model


def conv_bn(in_ch: int, out_ch: int, kernel_size: int, stride: int = 1) -> nn.Sequential:
    """Keras-'same' conv with bias -> BatchNorm (Keras defaults), no activation."""
    return nn.Sequential(Conv2dSame(in_ch, out_ch, kernel_size, stride), nn.BatchNorm2d(out_ch, **KERAS_BN))


class BasicBlock(nn.Module):
    """relu(conv_bn(relu(conv_bn(x))) + shortcut(x)); the shortcut is a 1x1 strided conv when the shape changes."""

    def __init__(self, in_ch: int, out_ch: int, stride: int = 1):
        super().__init__()
        self.conv1 = conv_bn(in_ch, out_ch, 3, stride)
        self.conv2 = conv_bn(out_ch, out_ch, 3)
        project = stride != 1 or in_ch != out_ch
        self.shortcut = Conv2dSame(in_ch, out_ch, 1, stride) if project else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv2(F.relu(self.conv1(x)))
        return F.relu(y + self.shortcut(x))


class AvgPoolSame(nn.Module):
    """Keras ``AveragePooling2D(k, padding='same')``: windows past the edge average only real pixels."""

    def __init__(self, kernel_size: int = 2):
        super().__init__()
        self.pool = nn.AvgPool2d(kernel_size, kernel_size, ceil_mode=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pool(x)


class ResNet(nn.Module):
    """ResNet with basic blocks, built the way the paper's Keras code builds ResNet34."""

    def __init__(self, num_classes: int = 8, input_size: int = 64, in_channels: int = 3,
                 layers: tuple[int, ...] = (3, 4, 6, 3), widths: tuple[int, ...] = (64, 128, 256, 512)):
        super().__init__()
        stem = [nn.ZeroPad2d(3), Conv2dSame(in_channels, widths[0], 7, 2), nn.BatchNorm2d(widths[0], **KERAS_BN),
                nn.ReLU(inplace=True), MaxPool2dSame(3, 2)]
        stages, c_in = [], widths[0]
        for i, (n, w) in enumerate(zip(layers, widths)):
            stride = 1 if i == 0 else 2
            stages.append(nn.Sequential(*[BasicBlock(c_in if j == 0 else w, w, stride if j == 0 else 1)
                                          for j in range(n)]))
            c_in = w
        self.features = nn.Sequential(*stem, *stages, AvgPoolSame(2))
        flat = math.prod(feature_shape(self.features, in_channels, input_size))
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(flat, num_classes))
        keras_init_(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


register_model(
    "resnet34", ResNet, "resnet",
    "Table 3 ResNet34: 7x7 stem, basic blocks 3/4/6/3 (64-512), 1x1 projections, avg-pool 2 -> Dense",
    optimizer="sgd",
)
