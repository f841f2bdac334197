"""The paper's AutoEncoder and AutoClassifier (Table 3; 2,245,224 Keras parameters for the classifier).

Encoder: 4 x [Conv 3x3 + bias -> BN -> ELU -> MaxPool 2x2 s2] (32, 64, 128, 256) -> Flatten -> Dense 64 (latent).
Decoder: Dense (s/8)^2 * 64 -> reshape (s/8, s/8, 64) -> 3 x [ConvTranspose 3x3 s2 + ELU] (128, 64, 32)
-> ConvTranspose 3x3 to 3 channels -> sigmoid (pixels are in [0, 1]).
Classifier: frozen encoder -> latent reshaped to 2x2x16 (Keras channels-last order) ->
5 x [conv block 32..512 + MaxPool 2x2 stride 1 'same'] -> Dropout 0.3 -> Flatten -> Dense.

Training is two-stage (see ``bloodcell.training.autoencoder``): the autoencoder learns to reconstruct, then the
encoder is frozen and the head is trained. ``AutoClassifier`` holds only encoder + head, so its weights file and
its parameter count are the classifier's; the decoder lives only during pre-training.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from bloodcell.models.blocks import KERAS_BN, ConvBNReLU, MaxPoolSame, keras_init_
from bloodcell.models.registry import feature_shape, register_model

ENCODER_WIDTHS = (32, 64, 128, 256)
HEAD_WIDTHS = (32, 64, 128, 256, 512)
SIZES = (32, 64, 128)  # the decoder's three 2x up-samplings must land on the input size exactly


class ConvEncoder(nn.Module):
    """Image -> ``latent``-dim code through 4 conv-BN-ELU-pool stages and a dense layer."""

    def __init__(self, input_size: int = 64, in_channels: int = 3, latent: int = 64,
                 widths: tuple[int, ...] = ENCODER_WIDTHS):
        super().__init__()
        stages, c_in = [], in_channels
        for w in widths:
            stages += [nn.Conv2d(c_in, w, 3, padding=1), nn.BatchNorm2d(w, **KERAS_BN), nn.ELU(inplace=True),
                       nn.MaxPool2d(2, 2)]
            c_in = w
        self.features = nn.Sequential(*stages)
        flat = math.prod(feature_shape(self.features, in_channels, input_size))
        self.latent = nn.Sequential(nn.Flatten(), nn.Linear(flat, latent))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.latent(self.features(x))


class ConvDecoder(nn.Module):
    """Latent code -> image in [0, 1]: dense to an (s/8)^2 x 64 map, three stride-2 transposed convs, then RGB."""

    def __init__(self, input_size: int = 64, out_channels: int = 3, latent: int = 64,
                 widths: tuple[int, ...] = (128, 64, 32)):
        super().__init__()
        if input_size % 8:
            raise ValueError(f"the decoder needs an input size divisible by 8, not {input_size}")
        self.side = input_size // 8
        self.dense = nn.Linear(latent, self.side * self.side * 64)
        layers, c_in = [], 64
        for w in widths:
            layers += [nn.ConvTranspose2d(c_in, w, 3, stride=2, padding=1, output_padding=1), nn.ELU(inplace=True)]
            c_in = w
        layers += [nn.ConvTranspose2d(c_in, out_channels, 3, padding=1), nn.Sigmoid()]
        self.up = nn.Sequential(*layers)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        x = self.dense(z).reshape(-1, self.side, self.side, 64).permute(0, 3, 1, 2)  # Keras reshape is NHWC
        return self.up(x)


class AutoEncoder(nn.Module):
    """Encoder + decoder; ``forward`` returns the reconstruction. Used for the AutoClassifier's first stage."""

    def __init__(self, encoder: ConvEncoder, decoder: ConvDecoder):
        super().__init__()
        self.encoder, self.decoder = encoder, decoder

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.encoder(x))


class AutoClassifier(nn.Module):
    """Frozen pre-trained encoder -> latent as a 2x2x16 map -> conv head -> class logits.

    ``needs_pretraining`` tells the training loop to run ``bloodcell.training.autoencoder.pretrain`` first;
    ``pretrain_epochs`` (default: the run's epochs) sets the length of that stage.
    """

    needs_pretraining = True
    # Grad-CAM on the encoder's last conv activation (s/8 side): the head's 2x2 maps are a reshaped dense
    # code with no image geometry, so maps there come out uniform.
    gradcam_layer = f"encoder.features.{4 * len(ENCODER_WIDTHS) - 2}"

    def __init__(self, num_classes: int = 8, input_size: int = 64, in_channels: int = 3, latent: int = 64,
                 latent_shape: tuple[int, int, int] = (2, 2, 16), dropout: float = 0.3,
                 pretrain_epochs: int | None = None):
        super().__init__()
        if math.prod(latent_shape) != latent:
            raise ValueError(f"latent shape {latent_shape} does not hold {latent} values")
        self.input_size, self.in_channels, self.latent_shape = input_size, in_channels, tuple(latent_shape)
        self.pretrain_epochs = pretrain_epochs
        self.encoder = ConvEncoder(input_size, in_channels, latent)
        stages, c_in = [], latent_shape[2]
        for w in HEAD_WIDTHS:
            stages.append(nn.Sequential(ConvBNReLU(c_in, w), MaxPoolSame()))
            c_in = w
        side = latent_shape[0] * latent_shape[1]
        self.head = nn.Sequential(*stages, nn.Dropout(dropout), nn.Flatten(), nn.Linear(c_in * side, num_classes))
        keras_init_(self)
        self.freeze_encoder(True)

    def freeze_encoder(self, frozen: bool) -> None:
        """Frozen: no gradients and BatchNorm in inference mode, as a Keras layer with ``trainable=False``."""
        for p in self.encoder.parameters():
            p.requires_grad_(not frozen)
        self.encoder.train(self.training and not frozen)

    def train(self, mode: bool = True) -> AutoClassifier:
        super().train(mode)
        frozen = not any(p.requires_grad for p in self.encoder.parameters())
        self.encoder.train(mode and not frozen)
        return self

    def make_autoencoder(self) -> AutoEncoder:
        """This classifier's encoder (shared, not copied) with a fresh decoder, for pre-training."""
        return AutoEncoder(self.encoder, keras_init_(ConvDecoder(self.input_size, self.in_channels)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w, c = self.latent_shape
        z = self.encoder(x).reshape(-1, h, w, c).permute(0, 3, 1, 2)  # Keras Reshape is channels-last
        return self.head(z)


register_model(
    "autoclassifier", AutoClassifier, "autoencoder",
    "Table 3 AutoClassifier: conv autoencoder pre-trained on MSE, frozen encoder -> 2x2x16 -> 5 conv blocks -> Dense",
    input_sizes=SIZES,
)
