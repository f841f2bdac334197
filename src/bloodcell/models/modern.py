"""Modern families for the accuracy/efficiency frontier (issue 32), trained from scratch by default.

torchvision's MobileNetV3-Small/-Large, EfficientNet-B0, ResNet18 and RegNetY-400MF, and timm's ViT-Tiny and
ConvNeXt-Atto. Each keeps the library's layers, so the library's ImageNet weights still fit (``--pretrained``);
only what throws away a small image changes:

* Stems. At ImageNet's 224 px the first conv halves the image (ResNet's max-pool and ConvNeXt's 4x4 patchify
  conv divide it by 4) before any block sees it. A 64 px blood cell would reach the first stage as a 32x32 or
  16x16 map, so for inputs up to ``SMALL_INPUT`` px the first conv runs at stride 1 (as the CIFAR variants of
  these networks do): ResNet18 also loses its max-pool, ConvNeXt's 4x4 conv pads 'same' at stride 1. The conv
  weights keep their shapes, so pretrained weights are loaded first and the stride changed after.
* ViT-Tiny has no stem to change: its patch size follows the input (``vit_patch_size``), so a 64 px image is
  8x8 = 64 tokens, as a 128 px one is with 16 px patches; with ``--pretrained`` timm resamples the 16 px patch
  embedding and the position embedding to fit.

With ``--pretrained`` the weights come from the libraries' own loaders (torchvision's weights enums, timm from
the Hugging Face hub), read from their caches (``$TORCH_HOME``, ``$HF_HOME``) or downloaded once. Offline and
not cached, the build fails with one line saying where to put the file; it never waits on retries.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

from torch import nn

from bloodcell.errors import BloodcellError, one_line
from bloodcell.models.blocks import Conv2dSame
from bloodcell.models.registry import register_model

SMALL_INPUT = 64  # inputs up to this size get a stride-1 stem
TIMM_HINT = "pip install 'bloodcell[models]'"


@dataclass(frozen=True)
class Arch:
    """Where a library model keeps what the small-input stem and a new head change (dotted module paths)."""

    arch: str  # the library's model name
    stem: str | None  # the first conv; None: nothing to change (ViT: the patch size is chosen instead)
    head: str  # the final Linear
    pool: str | None = None  # a stem max-pool to drop for small inputs (ResNet)


TORCHVISION = {
    "mobilenetv3-small": Arch("mobilenet_v3_small", stem="features.0.0", head="classifier.3"),
    "mobilenetv3-large": Arch("mobilenet_v3_large", stem="features.0.0", head="classifier.3"),
    "efficientnet-b0": Arch("efficientnet_b0", stem="features.0.0", head="classifier.1"),
    "resnet18": Arch("resnet18", stem="conv1", head="fc", pool="maxpool"),
    "regnety-400mf": Arch("regnet_y_400mf", stem="stem.0", head="fc"),
}
TIMM = {
    "vit-tiny": Arch("vit_tiny_patch16_224", stem=None, head="head"),
    "convnext-atto": Arch("convnext_atto", stem="stem.0", head="head.fc"),
}


def vit_patch_size(input_size: int) -> int:
    """4 px patches up to 32 px, 8 px below 128 px, 16 px (ViT's own) above: 49-64 tokens at the small sizes."""
    return 4 if input_size <= 32 else 8 if input_size < 128 else 16


def stride_one(conv: nn.Conv2d) -> nn.Conv2d:
    """The same conv (same weights) at stride 1 with an output as large as its input. An odd kernel padded by
    k // 2 only changes its stride; an even one (ConvNeXt's 4x4) becomes a Keras-'same' ``Conv2dSame``."""
    k = conv.kernel_size
    if all(n % 2 == 1 for n in k) and tuple(conv.padding) == tuple(n // 2 for n in k):
        conv.stride = (1, 1)
        return conv
    same = Conv2dSame(conv.in_channels, conv.out_channels, k, stride=1, bias=conv.bias is not None)
    same.load_state_dict(conv.state_dict())
    return same


def replace_module(model: nn.Module, path: str, module: nn.Module) -> None:
    parent, _, child = path.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def keep_stem_resolution(model: nn.Module, arch: Arch) -> None:
    """First conv at stride 1 and no stem max-pool: the first block sees the full small image."""
    if arch.stem is not None:
        replace_module(model, arch.stem, stride_one(model.get_submodule(arch.stem)))
    if arch.pool is not None:
        replace_module(model, arch.pool, nn.Identity())


def replace_head(model: nn.Module, path: str, num_classes: int) -> None:
    """A fresh ``num_classes`` Linear where the 1000-class ImageNet head was."""
    old = model.get_submodule(path)
    replace_module(model, path, nn.Linear(old.in_features, num_classes))


def host_reachable(url: str) -> bool:
    """Whether the download host resolves (or a proxy is set): without DNS no download can work, and the hub
    client would retry for most of a minute before saying so."""
    if any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return True
    import socket

    host = urlparse(url).hostname
    try:
        return bool(host) and bool(socket.getaddrinfo(host, 443))
    except OSError:
        return False


def failure(e: Exception) -> str:
    """An exception as one short line: its type and the first line of its message."""
    text = str(e).strip()
    return f"{type(e).__name__}: {one_line(text.splitlines()[0])}" if text else type(e).__name__


def offline_error(model: str, where: str) -> BloodcellError:
    return BloodcellError(f"model '{model}': its pretrained weights could not be downloaded (no network?) and are "
                          f"not cached; put {where}, or train without --pretrained")


def torchvision_state_dict(model: str, weights) -> dict:
    """The weights enum's state dict from ``$TORCH_HOME``'s cache, downloaded if missing; read with
    ``weights_only`` (a tampered cache file cannot run code)."""
    import torch

    file = Path(torch.hub.get_dir()) / "checkpoints" / Path(urlparse(weights.url).path).name
    if not file.is_file() and not host_reachable(weights.url):
        raise offline_error(model, f"{file.name} (from {weights.url}) in {file.parent} (set by TORCH_HOME)")
    try:
        return weights.get_state_dict(progress=True, check_hash=True, weights_only=True)
    except Exception as e:  # URLError, hash mismatch, a corrupt or pickled-code file: one line, never a traceback
        raise BloodcellError(f"model '{model}': cannot load the torchvision weights {file} "
                             f"({failure(e)})") from None


def build_torchvision(*, num_classes: int, input_size: int, variant: str, pretrained: bool = False) -> nn.Module:
    """A torchvision classifier: ImageNet weights loaded (on request) before the head and the stem change."""
    import torchvision.models as tvm

    arch = TORCHVISION[variant]
    if pretrained:
        weights = tvm.get_model_weights(arch.arch).DEFAULT
        model = tvm.get_model(arch.arch, num_classes=len(weights.meta["categories"]))
        model.load_state_dict(torchvision_state_dict(variant, weights))
        replace_head(model, arch.head, num_classes)
    else:
        model = tvm.get_model(arch.arch, num_classes=num_classes)
    if input_size <= SMALL_INPUT:
        keep_stem_resolution(model, arch)
    return model


def import_timm(model: str):
    try:
        import timm
    except ImportError:
        raise BloodcellError(f"model '{model}' needs timm: {TIMM_HINT}") from None
    return timm


def timm_weights_file(model: str, arch: str) -> str:
    """``model.safetensors`` of the timm model's Hugging Face repo: from the hub cache, downloaded if missing."""
    from huggingface_hub import constants, hf_hub_download, try_to_load_from_cache

    repo = import_timm(model).models.get_pretrained_cfg(arch).hf_hub_id
    cached = try_to_load_from_cache(repo, "model.safetensors")
    if isinstance(cached, str):
        return cached
    if constants.HF_HUB_OFFLINE or not host_reachable(constants.ENDPOINT):
        raise offline_error(model, f"model.safetensors of the Hugging Face repo {repo} in the hub cache "
                                   f"{constants.HF_HUB_CACHE} (set by HF_HOME), e.g. 'hf download {repo} "
                                   "model.safetensors' on a connected machine")
    try:
        return hf_hub_download(repo, "model.safetensors")
    except Exception as e:  # the hub client's HTTP and file errors
        raise BloodcellError(f"model '{model}': cannot download the weights of {repo} "
                             f"({failure(e)})") from None


def build_timm(*, num_classes: int, input_size: int, variant: str, pretrained: bool = False) -> nn.Module:
    """A timm classifier; timm's own loader drops the ImageNet head (and resamples ViT's patch and position
    embeddings) when loading; the stem changes after."""
    timm = import_timm(variant)
    arch = TIMM[variant]
    sized = {"img_size": input_size, "patch_size": vit_patch_size(input_size)} if arch.stem is None else {}
    source = {"pretrained_cfg_overlay": {"file": timm_weights_file(variant, arch.arch)}} if pretrained else {}
    model = timm.create_model(arch.arch, pretrained=pretrained, num_classes=num_classes, **sized, **source)
    if input_size <= SMALL_INPUT:
        keep_stem_resolution(model, arch)
    return model


_STEM = f"stem stride 1 up to {SMALL_INPUT} px"
for _name, _family, _desc in (
    ("mobilenetv3-small", "mobilenet", "torchvision MobileNetV3-Small: inverted residuals, SE, hard-swish"),
    ("mobilenetv3-large", "mobilenet", "torchvision MobileNetV3-Large: inverted residuals, SE, hard-swish"),
    ("efficientnet-b0", "efficientnet", "torchvision EfficientNet-B0: MBConv + SE, SiLU, dropout 0.2"),
    ("resnet18", "resnet", "torchvision ResNet18: basic blocks 2/2/2/2 (64-512), global avg-pool"),
    ("regnety-400mf", "regnet", "torchvision RegNetY-400MF: grouped bottlenecks + SE"),
):
    register_model(_name, build_torchvision, _family,
                   f"{_desc}; {_STEM}{' (no max-pool)' if TORCHVISION[_name].pool else ''}",
                   pretrained="torchvision ImageNet-1k", variant=_name)
register_model("vit-tiny", build_timm, "vit",
               "timm ViT-Tiny: 12 blocks, width 192, 3 heads; patch 4 px up to 32 px, 8 below 128, 16 above",
               optimizer="adamw", pretrained="timm ImageNet (Hugging Face hub)", variant="vit-tiny")
register_model("convnext-atto", build_timm, "convnext",
               f"timm ConvNeXt-Atto: stages 2/2/6/2 (40-320), 7x7 depthwise; 4x4 {_STEM}",
               optimizer="adamw", pretrained="timm ImageNet (Hugging Face hub)", variant="convnext-atto")
