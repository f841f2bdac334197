"""Model registry: every model is a plain ``nn.Module`` built from a name and a few arguments."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from bloodcell.errors import BloodcellError


@dataclass(frozen=True)
class ModelSpec:
    """What the registry knows of a model: how to build it and the paper's training defaults."""

    name: str
    family: str
    description: str
    builder: Callable[..., nn.Module]
    kwargs: dict = field(default_factory=dict)
    optimizer: str = "adam"  # the paper's choice; SGD for Inception and ResNet
    input_sizes: tuple[int, ...] | None = None  # None: any size the architecture can reduce
    pretrained: str | None = None  # where --pretrained weights come from (None: the model has no library weights)


_REGISTRY: dict[str, ModelSpec] = {}


def register_model(
    name: str,
    builder: Callable[..., nn.Module],
    family: str,
    description: str,
    optimizer: str = "adam",
    input_sizes: tuple[int, ...] | None = None,
    pretrained: str | None = None,
    **kwargs,
) -> ModelSpec:
    """Register ``builder(num_classes=, input_size=, **kwargs)`` under ``name``; with ``pretrained`` (the weights'
    source) the builder also takes ``pretrained=True``."""
    if name in _REGISTRY:
        raise ValueError(f"model '{name}' is already registered")
    spec = ModelSpec(name, family, description, builder, kwargs, optimizer, input_sizes, pretrained)
    _REGISTRY[name] = spec
    return spec


def _load_families() -> None:
    # Importing a family module registers its models.
    from bloodcell.models import autoencoder, cnn, cnn_ablation, inception, modern, resnet, se_resnet, vgg  # noqa: F401


def get_spec(name: str) -> ModelSpec:
    _load_families()
    try:
        return _REGISTRY[name]
    except KeyError:
        raise BloodcellError(f"unknown model '{name}' (known: {', '.join(sorted(_REGISTRY))})") from None


def list_models() -> list[ModelSpec]:
    _load_families()
    return [_REGISTRY[n] for n in sorted(_REGISTRY)]


def create_model(name: str, num_classes: int = 8, input_size: int = 64, *, pretrained: bool = False,
                 **overrides) -> nn.Module:
    """Build a registered model; overrides replace the registered keyword arguments. ``pretrained`` starts from
    the library's weights (downloaded once), for the models that have them."""
    spec = get_spec(name)
    if spec.input_sizes is not None and input_size not in spec.input_sizes:
        sizes = ", ".join(map(str, spec.input_sizes))
        raise BloodcellError(f"model '{name}' is defined for input sizes {sizes}, not {input_size}")
    check_pretrained(spec, pretrained)
    extra = {"pretrained": True} if pretrained else {}
    try:
        return spec.builder(num_classes=num_classes, input_size=input_size, **{**spec.kwargs, **overrides}, **extra)
    except (ValueError, RuntimeError, TypeError) as e:
        raise BloodcellError(f"cannot build model '{name}' at {input_size}x{input_size}: {e}") from None


def check_pretrained(spec: ModelSpec, pretrained: bool) -> None:
    """``--pretrained`` only for models with library weights; the others say which models have them."""
    if pretrained and spec.pretrained is None:
        having = ", ".join(s.name for s in list_models() if s.pretrained)
        raise BloodcellError(f"model '{spec.name}' has no pretrained weights (it is trained from scratch); "
                             f"--pretrained works for {having}")


def count_params_keras(model: nn.Module) -> int:
    """Parameters as Keras ``count_params()`` counts them: all weights plus BatchNorm moving statistics."""
    n = sum(p.numel() for p in model.parameters())
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.running_mean is not None:
            n += m.running_mean.numel() + m.running_var.numel()
    return n


def count_params_trainable(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def feature_shape(features: nn.Module, in_channels: int, input_size: int) -> torch.Size:
    """Output shape (C, H, W) of ``features`` for one input, found by a dry run."""
    was_training = features.training
    features.eval()
    with torch.no_grad():
        out = features(torch.zeros(1, in_channels, input_size, input_size))
    features.train(was_training)
    if out.numel() == 0 or min(out.shape[2:], default=1) < 1:
        raise ValueError(f"input {input_size}px is too small: the features reduce it to {tuple(out.shape[1:])}")
    return out.shape[1:]
