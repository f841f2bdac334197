"""The paper's CNN family: the plain CNN of Table 3 and its attention variants SE-, SA- and CBAM-CNN."""

from __future__ import annotations

import math

import torch
from torch import nn

from bloodcell.models.blocks import ConvBNReLU, MaxPoolSame, keras_init_, make_attention
from bloodcell.models.registry import feature_shape, register_model


class PaperCNN(nn.Module):
    """Conv blocks of growing width, each followed by max-pooling and (optionally) an attention block.

    ``pool``: ``"stride2"`` halves the map (2x2, stride 2, Keras 'valid'); ``"stride1"`` is the Keras
    ``MaxPooling2D(2, strides=1, padding='same')`` of the paper's plain CNN, which keeps 64x64 all the way
    and so ends in a 1M-wide dense layer.
    ``bn_momentum`` is PyTorch's (Keras 0.99 = 0.01 here): so slow an average needs a few hundred steps
    before eval-mode predictions are sound; raise it (e.g. 0.1) for small datasets.
    ``pool_last=False`` drops the pooling (and attention) after the last conv block; ``hidden`` > 0 adds
    Dense(hidden) + ReLU before the output layer (the Table 2 ablations, see ``cnn_ablation``).
    """

    def __init__(
        self,
        num_classes: int = 8,
        input_size: int = 64,
        in_channels: int = 3,
        widths: tuple[int, ...] = (32, 64, 128, 256),
        pool: str = "stride2",
        attention: str = "none",
        dropout: float = 0.0,
        batch_norm: bool = True,
        bn_momentum: float = 0.01,
        pool_last: bool = True,
        hidden: int = 0,
    ):
        super().__init__()
        if pool not in ("stride1", "stride2"):
            raise ValueError(f"pool must be 'stride1' or 'stride2', not '{pool}'")
        stages = []
        c_in = in_channels
        for i, w in enumerate(widths):
            stage = [ConvBNReLU(c_in, w, batch_norm=batch_norm, bn_momentum=bn_momentum)]
            if pool_last or i < len(widths) - 1:
                stage.append(nn.MaxPool2d(2, 2) if pool == "stride2" else MaxPoolSame())
                stage.append(make_attention(attention, w))
            stages.append(nn.Sequential(*stage))
            c_in = w
        self.features = nn.Sequential(*stages)
        flat = math.prod(feature_shape(self.features, in_channels, input_size))
        dense: list[nn.Module] = [nn.Linear(flat, hidden), nn.ReLU(inplace=True)] if hidden else []
        self.head = nn.Sequential(
            nn.Flatten(), *dense, nn.Dropout(dropout), nn.Linear(hidden or flat, num_classes)
        )
        keras_init_(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


register_model(
    "cnn", PaperCNN, "cnn",
    "Table 3 CNN: 4 conv blocks 32-256, max-pool 2x2 stride 1 (same), dense on 64x64x256",
    pool="stride1",
)
for _att, _label in (("se", "channel attention (paper 'SE')"), ("sa", "spatial attention"), ("cbam", "CBAM")):
    register_model(
        f"{_att}-cnn", PaperCNN, "attention-cnn",
        f"CNN with {_label} after each pooled conv block, dropout 0.2",
        attention=_att, dropout=0.2,
    )
register_model(
    "se-cnn-slim", PaperCNN, "attention-cnn",
    "SE-CNN at a quarter of the compute: conv blocks 16/32/64/96, channel attention, dropout 0.2 (under 100k "
    "parameters at 64 px; the frontier's smallest point)",
    attention="se", dropout=0.2, widths=(16, 32, 64, 96),
)
register_model(
    "se-classic-cnn", PaperCNN, "attention-cnn",
    "CNN with classic squeeze-excitation (Hu et al., avg-pool MLP r=16, with bias) after each block, dropout 0.2",
    attention="se-classic", dropout=0.2,
)
