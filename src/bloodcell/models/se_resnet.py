"""SE-ResNet: our own design for the frontier, SE-CNN made deeper with residual blocks at the same budget.

SE-CNN has four conv layers; at 64 px its later layers see little of a cell. Here the paper's channel
attention sits in residual basic blocks (two 3x3 convs), several per stage, and a global average pool replaces
the flatten, so depth costs parameters only through the widths and any input size works. The stem keeps the
full resolution (one 3x3 conv, no stride) before the first max-pool, so a 28 or 64 px image is not thrown
away in the first layer.
"""

from __future__ import annotations

import torch
from torch import nn

from bloodcell.models.blocks import ChannelAttention
from bloodcell.models.registry import register_model


def conv_bn(in_ch: int, out_ch: int, kernel_size: int = 3) -> nn.Sequential:
    """Conv (no bias, 'same' padding) -> BatchNorm."""
    return nn.Sequential(nn.Conv2d(in_ch, out_ch, kernel_size, padding=kernel_size // 2, bias=False),
                         nn.BatchNorm2d(out_ch))


class SEBasicBlock(nn.Module):
    """relu(attention(conv-bn-relu-conv-bn(x)) + shortcut(x)); the shortcut is a 1x1 conv when widths differ.

    The second BatchNorm starts at zero scale, so each block starts as the identity (Goyal et al. 2017): deep
    stacks train from the first step without warm-up.
    """

    def __init__(self, in_ch: int, out_ch: int, attention_ratio: int = 8):
        super().__init__()
        self.body = nn.Sequential(conv_bn(in_ch, out_ch), nn.ReLU(inplace=True), conv_bn(out_ch, out_ch))
        nn.init.zeros_(self.body[-1][1].weight)
        self.attention = ChannelAttention(out_ch, attention_ratio)
        self.shortcut = nn.Identity() if in_ch == out_ch else conv_bn(in_ch, out_ch, 1)
        self.act = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.attention(self.body(x)) + self.shortcut(x))


class SEResNet(nn.Module):
    """Stem conv at full resolution, then per stage a 2x2 max-pool and ``depth`` SE basic blocks; global average
    pool, dropout, linear."""

    def __init__(
        self,
        num_classes: int = 8,
        input_size: int = 64,
        in_channels: int = 3,
        widths: tuple[int, ...] = (16, 32, 64, 128),
        depths: tuple[int, ...] = (2, 2, 2, 1),
        dropout: float = 0.2,
    ):
        super().__init__()
        if not all(isinstance(n, int) for n in (*widths, *depths)):
            raise ValueError(f"widths and depths must be lists of integers, e.g. widths=[16,32,64,128], not "
                             f"{widths!r} and {depths!r}")
        if len(widths) != len(depths) or not widths or min(depths) < 1:
            raise ValueError(f"widths {tuple(widths)} and depths {tuple(depths)} need one depth >= 1 per width")
        if input_size >> len(widths) < 1:
            raise ValueError(f"input {input_size}px is too small for {len(widths)} stages of 2x2 max-pooling")
        self.stem = nn.Sequential(conv_bn(in_channels, widths[0]), nn.ReLU(inplace=True))
        stages, c_in = [], widths[0]
        for width, depth in zip(widths, depths):
            blocks = [SEBasicBlock(c_in if i == 0 else width, width) for i in range(depth)]
            stages.append(nn.Sequential(nn.MaxPool2d(2, 2), *blocks))
            c_in = width
        self.stages = nn.Sequential(*stages)
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Dropout(dropout),
                                  nn.Linear(c_in, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.stages(self.stem(x)))


register_model(
    "se-resnet", SEResNet, "se-resnet",
    "our frontier design: SE-CNN's channel attention in residual blocks, stages 2/2/2/1 (16-128), global "
    "avg-pool, dropout 0.2; full-resolution stem (under 0.5M parameters)",
    widths=(16, 32, 64, 128), depths=(2, 2, 2, 1),
)
register_model(
    "se-resnet-slim", SEResNet, "se-resnet",
    "se-resnet at a quarter of the parameters: stages 2/2/2/1 (8-56), global avg-pool (under 100k parameters)",
    widths=(8, 16, 32, 56), depths=(2, 2, 2, 1),
)
