"""The paper's VGG family: the Table 3 VGG, the VGG-8/12/15/18 depth study and the attention VGG-15s.

A stage is ``n`` conv blocks (Conv 3x3 + bias -> BN -> ReLU) -> MaxPool 2x2 stride 2 -> optional attention.

Depth rule for ``vggD`` (the paper names VGG-8/12/15/18 but gives only VGG-15's layout, 2,2,2,3,3 conv blocks
over 5 stages of 32..512 filters + 3 dense layers): D counts weight layers, so D - 3 conv blocks are spread
over the 5 stages as evenly as possible, the extra ones going to the deepest stages (as in VGG-15):
VGG-8 = 1,1,1,1,1; VGG-12 = 1,2,2,2,2; VGG-15 = 2,2,2,3,3; VGG-18 = 3,3,3,3,3. All share VGG-15's head
Dense 512 -> Dropout 0.2 -> Dense 256 -> Dropout 0.2 -> Dense classes.

The attention VGG-15s of Table 3 use 2,2,2,2,3 conv blocks (the authors' code; 11 convs, not 12) with an
attention block after every pool, then Dropout 0.2 -> Dense classes on the 2x2x512 map.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from bloodcell.models.blocks import ConvBNReLU, keras_init_, make_attention
from bloodcell.models.registry import feature_shape, register_model

VGG_WIDTHS = (32, 64, 128, 256, 512)


def vgg_depths(depth: int, stages: int = 5) -> tuple[int, ...]:
    """Conv blocks per stage for a VGG-``depth`` with 3 dense layers (see the module docstring)."""
    convs = depth - 3
    if convs < stages:
        raise ValueError(f"VGG-{depth} has fewer conv layers ({convs}) than stages ({stages})")
    base, extra = divmod(convs, stages)
    return tuple(base + (i >= stages - extra) for i in range(stages))


class VGG(nn.Module):
    """Stages of conv blocks, each closed by a 2x2 stride-2 max-pool and an optional attention block."""

    def __init__(
        self,
        num_classes: int = 8,
        input_size: int = 64,
        in_channels: int = 3,
        depths: tuple[int, ...] = (2, 2, 2, 2),
        widths: tuple[int, ...] = (32, 64, 128, 256),
        attention: str = "none",
        hidden: tuple[int, ...] = (),
        dropout: float = 0.0,
        bn_momentum: float = 0.01,
    ):
        super().__init__()
        if len(depths) != len(widths):
            raise ValueError(f"{len(depths)} stage depths but {len(widths)} widths")
        stages, c_in = [], in_channels
        for n, w in zip(depths, widths):
            convs = [ConvBNReLU(c_in if i == 0 else w, w, bn_momentum=bn_momentum) for i in range(n)]
            stages.append(nn.Sequential(*convs, nn.MaxPool2d(2, 2), make_attention(attention, w)))
            c_in = w
        self.features = nn.Sequential(*stages)
        flat = math.prod(feature_shape(self.features, in_channels, input_size))
        layers: list[nn.Module] = [nn.Flatten()]
        for h in hidden:
            layers += [nn.Linear(flat, h), nn.ReLU(inplace=True), nn.Dropout(dropout)]
            flat = h
        if not hidden:
            layers.append(nn.Dropout(dropout))
        self.head = nn.Sequential(*layers, nn.Linear(flat, num_classes))
        keras_init_(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


FIVE_STAGE_SIZES = (32, 64, 96, 128, 160, 192, 224, 256)  # five 2x pools need a multiple of 32

register_model(
    "vgg", VGG, "vgg",
    "Table 3 VGG: 4 stages x 2 conv blocks (32-256) + max-pool s2 -> Flatten -> Dense",
    depths=(2, 2, 2, 2), widths=(32, 64, 128, 256),
)
for _depth in (8, 12, 15, 18):
    register_model(
        f"vgg{_depth}", VGG, "vgg-depth",
        f"VGG-{_depth}: conv blocks {','.join(map(str, vgg_depths(_depth)))} (32-512) -> Dense 512 -> Dense 256"
        " -> Dense, dropout 0.2",
        input_sizes=FIVE_STAGE_SIZES,
        depths=vgg_depths(_depth), widths=VGG_WIDTHS, hidden=(512, 256), dropout=0.2,
    )
for _att, _label in (("se", "channel attention (paper 'SE')"), ("sa", "spatial attention"), ("cbam", "CBAM")):
    register_model(
        f"{_att}-vgg15", VGG, "attention-vgg",
        f"Table 3 {_att.upper()}-VGG15: conv blocks 2,2,2,2,3 (32-512), {_label} after each pool, dropout 0.2",
        input_sizes=FIVE_STAGE_SIZES,
        depths=(2, 2, 2, 2, 3), widths=VGG_WIDTHS, attention=_att, dropout=0.2,
    )
