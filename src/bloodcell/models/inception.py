"""The paper's Inception (Table 3): a small-input Inception-v4 with 15,586,888 Keras parameters.

Known from the authors' code: stem 32 (s1) -> 64 (s2) -> 96; 2x Inception-A (384 ch); Reduction-A (576);
3x Inception-B (1024); Reduction-B (1408); 1x Inception-C (1536); Flatten 8x8x1536 -> Dropout 0.2 -> Dense.
All convs are Keras 'same' conv + bias -> BN -> ReLU; at 64x64 the maps are 32 (stem), 16, 8.

The branch layouts are not published. Inception-A, -B and -C are exactly Inception-v4's (Szegedy et al. 2017),
which gives their stated widths 384/1024/1536. The reductions are narrower than v4's (576 = 384 + 96 + 96,
1408 = 1024 + 192 + 192): we kept v4's branch shapes (max-pool | 3x3 s2 | 1x1 -> 3x3 -> 3x3 s2 for A;
max-pool | 1x1 -> 3x3 s2 | 1x1 -> 1x7 -> 7x1 -> 3x3 s2 for B) and solved for widths from {32, 64, ..., 384}
with equal output branches (96/96 and 192/192) and v4's 192 -> 192 first branch in Reduction-B. The total then
fixes 15,586,888 exactly, but the count does not identify the layout: other widths give the same number
(the authors' Inception code was not found in the reference material, so this is a reconstruction).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from bloodcell.models.blocks import ConvBNAct, MaxPool2dSame, keras_init_
from bloodcell.models.registry import feature_shape, register_model


def conv_chain(c_in: int, *layers: tuple[int, int | tuple[int, int], int]) -> nn.Sequential:
    """Conv blocks ``(out_channels, kernel, stride)`` one after another."""
    blocks = []
    for c_out, k, s in layers:
        blocks.append(ConvBNAct(c_in, c_out, k, s))
        c_in = c_out
    return nn.Sequential(*blocks)


class Concat(nn.Module):
    """Run branches on the same input and concatenate their outputs along channels."""

    def __init__(self, *branches: nn.Module):
        super().__init__()
        self.branches = nn.ModuleList(branches)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([b(x) for b in self.branches], dim=1)


def avg_pool_branch(c_in: int, c_out: int) -> nn.Sequential:
    """3x3 average pool (Keras 'same': padding not averaged) -> 1x1 conv block."""
    return nn.Sequential(nn.AvgPool2d(3, 1, 1, count_include_pad=False), ConvBNAct(c_in, c_out, 1))


def inception_a(c_in: int) -> Concat:
    """Inception-v4 block A: 96 + 96 + 96 + 96 = 384 channels."""
    return Concat(
        avg_pool_branch(c_in, 96),
        conv_chain(c_in, (96, 1, 1)),
        conv_chain(c_in, (64, 1, 1), (96, 3, 1)),
        conv_chain(c_in, (64, 1, 1), (96, 3, 1), (96, 3, 1)),
    )


def reduction_a(c_in: int) -> Concat:
    """Halves the map: max-pool (c_in) + 96 + 96 channels."""
    return Concat(
        MaxPool2dSame(3, 2),
        conv_chain(c_in, (96, 3, 2)),
        conv_chain(c_in, (32, 1, 1), (32, 3, 1), (96, 3, 2)),
    )


def inception_b(c_in: int) -> Concat:
    """Inception-v4 block B with factorised 7x7 convolutions: 128 + 384 + 256 + 256 = 1024 channels."""
    return Concat(
        avg_pool_branch(c_in, 128),
        conv_chain(c_in, (384, 1, 1)),
        conv_chain(c_in, (192, 1, 1), (224, (1, 7), 1), (256, (7, 1), 1)),
        conv_chain(c_in, (192, 1, 1), (192, (1, 7), 1), (224, (7, 1), 1), (224, (1, 7), 1), (256, (7, 1), 1)),
    )


def reduction_b(c_in: int) -> Concat:
    """Halves the map: max-pool (c_in) + 192 + 192 channels."""
    return Concat(
        MaxPool2dSame(3, 2),
        conv_chain(c_in, (192, 1, 1), (192, 3, 2)),
        conv_chain(c_in, (96, 1, 1), (128, (1, 7), 1), (96, (7, 1), 1), (192, 3, 2)),
    )


def split_1x3_3x1(c_in: int, c_out: int) -> Concat:
    """Inception-v4's parallel 1x3 and 3x1 convolutions on one input (2 * c_out channels)."""
    return Concat(ConvBNAct(c_in, c_out, (1, 3)), ConvBNAct(c_in, c_out, (3, 1)))


def inception_c(c_in: int) -> Concat:
    """Inception-v4 block C: 256 + 256 + 512 + 512 = 1536 channels."""
    return Concat(
        avg_pool_branch(c_in, 256),
        conv_chain(c_in, (256, 1, 1)),
        nn.Sequential(ConvBNAct(c_in, 384, 1), split_1x3_3x1(384, 256)),
        nn.Sequential(conv_chain(c_in, (384, 1, 1), (448, (1, 3), 1), (512, (3, 1), 1)), split_1x3_3x1(512, 256)),
    )


class Inception(nn.Module):
    """Stem -> 2 A -> Reduction-A -> 3 B -> Reduction-B -> 1 C -> Flatten -> Dropout -> Dense."""

    def __init__(self, num_classes: int = 8, input_size: int = 64, in_channels: int = 3, dropout: float = 0.2,
                 blocks: tuple[int, int, int] = (2, 3, 1)):
        super().__init__()
        n_a, n_b, n_c = blocks
        self.features = nn.Sequential(
            conv_chain(in_channels, (32, 3, 1), (64, 3, 2), (96, 3, 1)),
            *[inception_a(96 if i == 0 else 384) for i in range(n_a)],
            reduction_a(384),
            *[inception_b(576 if i == 0 else 1024) for i in range(n_b)],
            reduction_b(1024),
            *[inception_c(1408 if i == 0 else 1536) for i in range(n_c)],
        )
        flat = math.prod(feature_shape(self.features, in_channels, input_size))
        self.head = nn.Sequential(nn.Flatten(), nn.Dropout(dropout), nn.Linear(flat, num_classes))
        keras_init_(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


register_model(
    "inception", Inception, "inception",
    "Table 3 Inception (v4-style): stem 32/64/96, 2xA, Red-A, 3xB, Red-B, 1xC -> Flatten -> Dropout 0.2 -> Dense",
    optimizer="sgd",
)
