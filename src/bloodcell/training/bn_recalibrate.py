"""BatchNorm statistics recomputed for the current weights before each validation.

Running averages lag the weights: with Keras' momentum (0.01) they still hold the initial statistics after the
first epoch (validation near chance), and with PyTorch's 0.1 they follow the last few batches only, so validation
jumps from epoch to epoch and the saved weights carry noisy statistics. A pass over a fixed sample of training
images with BatchNorm's cumulative average (momentum None) gives the population statistics of this exact model,
for a fraction of an epoch's cost.
"""

from __future__ import annotations

import torch
from torch import nn

from bloodcell.data.tensors import ShardedImages


def batch_norms(model: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


def recalibration_sample(x_train, n: int, seed: int) -> torch.Tensor:
    """``n`` training images (uint8, on the training device) drawn once with their own generator, so the
    training run's random stream is untouched and a resumed run recalibrates on the same images."""
    k = min(n, len(x_train))
    idx = torch.randperm(len(x_train), generator=torch.Generator().manual_seed(seed + 104_729))[:k].sort().values
    return x_train[idx if isinstance(x_train, ShardedImages) else idx.to(x_train.device)]


@torch.no_grad()
def recalibrate_bn(model: nn.Module, images: torch.Tensor, normalize: nn.Module, *, batch_size: int = 256) -> None:
    """Replace every BatchNorm's running mean and variance by their average over ``images``; only BatchNorm is
    put in training mode (dropout stays off), and each layer's momentum is restored afterwards."""
    bns = batch_norms(model)
    if not bns or len(images) == 0:
        return
    was_training = model.training
    momenta = [m.momentum for m in bns]
    model.eval()
    for m in bns:
        m.reset_running_stats()
        m.momentum = None  # cumulative average over the batches below
        m.train()
    try:
        for i in range(0, len(images), batch_size):
            model(normalize(images[i : i + batch_size]))
    finally:
        for m, momentum in zip(bns, momenta):
            m.momentum = momentum
        model.train(was_training)
