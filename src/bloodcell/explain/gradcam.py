"""Grad-CAM heatmaps for any registered model, and two measurements of how much they can be trusted.

Why captum's ``LayerGradCam`` rather than hand-written hooks: it is the maintained reference implementation
(gradient averaging, layer hooks, multiple-call checks, batched targets), and its ``LayerAttribution.interpolate``
does the upsampling, so the only code here is choosing the layer and measuring the maps.

The target layer is found generically by a dry forward pass with hooks on every sub-module: candidates are
modules called once whose output is a 4-D tensor with H, W > 1; the default is the last of them to finish
with at least ``MIN_MAP_SIDE`` x ``MIN_MAP_SIDE`` cells (the last spatial conv/attention output that still has
some geometry), so it works for any architecture in the registry, unless the model names its own
``gradcam_layer``.

Measurements (written to ``explain/gradcam_report.json``):

* centre energy share: of the positive part of a heatmap, the fraction inside a centred disc of radius
  ``CENTRE_RADIUS * size`` (the cell; the datasets are centre-cropped around it). A uniform map gives
  ``pi * 0.35^2 = 0.385``, so values well above that mean the model looks at the cell, not the background.
* model-randomisation check (Adebayo et al. 2018, "Sanity checks for saliency maps"): Spearman rank
  correlation between the trained model's maps and those of the same architecture with re-initialised
  weights, same target class. Near 1 means the maps do not depend on what the model learned.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import numpy as np
import torch
from captum.attr import LayerAttribution, LayerGradCam
from scipy.stats import spearmanr
from torch import nn

from bloodcell.data.tensors import to_uint8_nchw
from bloodcell.errors import BloodcellError
from bloodcell.inference import Classifier

CENTRE_RADIUS = 0.35  # of the image side
# A 2x2 map upsamples to four mirror-symmetric quadrants: every centred measurement of it equals the uniform
# map's, whatever the model learned (the VGG15s and ResNet34 end at 2x2 on 64 px inputs).
MIN_MAP_SIDE = 4


@dataclass
class LayerInfo:
    name: str
    type: str
    shape: tuple[int, ...]  # (C, H, W) of the output


def spatial_layers(model: nn.Module, size: int) -> list[LayerInfo]:
    """Modules whose output is a C x H x W map with H, W > 1, in the order they finish in a forward pass.

    Modules called more than once (shared activations) are left out: a layer attribution needs one output.
    """
    calls: dict[str, int] = {}
    outputs: list[tuple[str, nn.Module, tuple[int, ...]]] = []
    hooks = []

    def make_hook(name: str):
        def hook(module, _inputs, output):
            calls[name] = calls.get(name, 0) + 1
            if isinstance(output, torch.Tensor) and output.dim() == 4 and min(output.shape[2:]) > 1:
                outputs.append((name, module, tuple(output.shape[1:])))
        return hook

    for name, module in model.named_modules():
        if name:
            hooks.append(module.register_forward_hook(make_hook(name)))
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(torch.zeros(1, 3, size, size, device=next(model.parameters()).device))
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    return [LayerInfo(n, type(m).__name__, s) for n, m, s in outputs if calls[n] == 1]


def default_layer(model: nn.Module, layers: list[LayerInfo]) -> str:
    """The model's own ``gradcam_layer`` if it names one, else the last layer of at least ``MIN_MAP_SIDE`` cells.

    A model declares its layer when its last spatial maps have no image geometry (the AutoClassifier's head
    convolves a reshaped dense code), where the generic choice would give meaningless, uniform maps. Without
    a layer that large, the last spatial layer is the best there is.
    """
    named = getattr(model, "gradcam_layer", None)
    if named:
        return named
    large = [x for x in layers if min(x.shape[1:]) >= MIN_MAP_SIDE]
    return (large or layers)[-1].name


def find_layer(model: nn.Module, size: int, name: str | None = None) -> tuple[str, nn.Module]:
    """The named layer, or by default ``default_layer``."""
    layers = spatial_layers(model, size)
    if not layers:
        raise BloodcellError(f"model {type(model).__name__} has no layer with a spatial output at {size}px")
    name = name or default_layer(model, layers)
    if name not in {x.name for x in layers}:
        raise BloodcellError(f"layer '{name}' is not a spatial layer of this model "
                             f"(see 'bloodcell explain --list-layers RUN_DIR'; last: {layers[-1].name})")
    return name, model.get_submodule(name)


def _without_inplace(model: nn.Module) -> nn.Module:
    """A copy with in-place activations turned off: they would overwrite the layer output captum keeps."""
    model = copy.deepcopy(model).float().eval()
    for m in model.modules():
        if getattr(m, "inplace", False):
            m.inplace = False
    return model


class GradCam:
    """Grad-CAM of a trained model, with its ``Classifier``'s preprocessing and device."""

    def __init__(self, classifier: Classifier, layer: str | None = None):
        self.classifier = classifier
        self.size = classifier.input_size
        self.model = _without_inplace(classifier.model)
        self.layer_name, layer_module = find_layer(self.model, self.size, layer)
        self.cam = LayerGradCam(self.model, layer_module)

    def class_index(self, name: str) -> int:
        if name not in self.classifier.class_names:
            raise BloodcellError(f"--class '{name}' is not one of the model's classes "
                                 f"({', '.join(self.classifier.class_names)})")
        return self.classifier.class_names.index(name)

    def maps(self, images: np.ndarray, targets: np.ndarray | None = None, batch_size: int = 64
             ) -> tuple[np.ndarray, np.ndarray]:
        """Signed heatmaps (N x H x W at input size) and the probabilities; target None = predicted class."""
        probs = self.classifier.predict_arrays(images)
        targets = probs.argmax(1) if targets is None else np.broadcast_to(np.asarray(targets), len(images))
        return heatmaps(self.cam, self.classifier.norm, images, targets, batch_size), probs


def heatmaps(cam: LayerGradCam, norm, images: np.ndarray, targets: np.ndarray,
             batch_size: int = 64) -> np.ndarray:
    """captum Grad-CAM (no ReLU, so the sign is kept) upsampled bilinearly to the images' size."""
    h, w = images.shape[1:3]
    device = next(cam.forward_func.parameters()).device
    out = []
    for i in range(0, len(images), batch_size):
        x = norm(to_uint8_nchw(images[i : i + batch_size]).to(device))
        t = torch.tensor(np.array(targets[i : i + batch_size]), dtype=torch.long, device=device)
        a = cam.attribute(x, target=t, relu_attributions=False)
        a = LayerAttribution.interpolate(a, (h, w), interpolate_mode="bilinear").detach()
        out.append(a[:, 0].float().cpu().numpy())
    return np.concatenate(out) if out else np.zeros((0, h, w), np.float32)


def centre_mask(size: int, radius: float = CENTRE_RADIUS) -> np.ndarray:
    """Boolean disc centred in a size x size image, radius ``radius * size``."""
    yy, xx = np.mgrid[:size, :size]
    c = (size - 1) / 2
    return (yy - c) ** 2 + (xx - c) ** 2 <= (radius * size) ** 2


def centre_energy_share(maps: np.ndarray, radius: float = CENTRE_RADIUS) -> np.ndarray:
    """Per map: positive energy inside the centred disc / all positive energy (NaN if nothing is positive)."""
    pos = np.clip(maps, 0, None)
    total = pos.sum(axis=(1, 2))
    inside = pos[:, centre_mask(maps.shape[1], radius)].sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(total > 0, inside / total, np.nan)


def rank_correlations(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Spearman correlation of each pair of maps (NaN where a map is constant)."""
    out = []
    for x, y in zip(a.reshape(len(a), -1), b.reshape(len(b), -1)):
        if np.ptp(x) == 0 or np.ptp(y) == 0:
            out.append(np.nan)
        else:
            out.append(spearmanr(x, y).statistic)
    return np.asarray(out, dtype=float)


def randomised_copy(classifier: Classifier, seed: int = 0) -> nn.Module:
    """The same architecture with fresh random weights (the model-randomisation test's control)."""
    from bloodcell.models import create_model

    meta = classifier.meta
    torch.manual_seed(seed)
    model = create_model(meta["model"], num_classes=classifier.num_classes, input_size=classifier.input_size,
                         **meta.get("model_args", {}))
    return _without_inplace(model.to(classifier.device))


def randomisation_check(gc: GradCam, images: np.ndarray, targets: np.ndarray, seed: int = 0) -> np.ndarray:
    """Per image: Spearman correlation of trained vs re-initialised model maps for the same target class."""
    trained = heatmaps(gc.cam, gc.classifier.norm, images, targets)
    random_model = randomised_copy(gc.classifier, seed)
    layer = random_model.get_submodule(gc.layer_name)
    random_maps = heatmaps(LayerGradCam(random_model, layer), gc.classifier.norm, images, targets)
    return rank_correlations(trained, random_maps)


def _nanmean(x: np.ndarray) -> float | None:
    x = np.asarray(x, dtype=float)
    return round(float(np.nanmean(x)), 4) if np.isfinite(x).any() else None


def measure(gc: GradCam, images: np.ndarray, labels: np.ndarray, class_names: list[str],
            randomisation_images: int = 64, seed: int = 0) -> dict:
    """Centre energy share (overall and per true class) and the randomisation check, for these images."""
    maps, probs = gc.maps(images)
    pred = probs.argmax(1)
    share = centre_energy_share(maps)
    n_rand = min(randomisation_images, len(images))
    rho = randomisation_check(gc, images[:n_rand], pred[:n_rand], seed)
    return {
        "layer": gc.layer_name,
        "images": int(len(images)),
        "centre_region": f"centred disc, radius {CENTRE_RADIUS} x image side",
        "centre_share_uniform_baseline": round(float(centre_mask(images.shape[1]).mean()), 4),
        "centre_energy_share_mean": _nanmean(share),
        "centre_energy_share_per_class": {c: _nanmean(share[labels == i]) for i, c in enumerate(class_names)},
        "randomisation_spearman_mean": _nanmean(rho),
        "randomisation_spearman_std": round(float(np.nanstd(rho)), 4) if np.isfinite(rho).any() else None,
        "randomisation_images": int(n_rand),
        "accuracy_on_these_images": round(float((pred == labels).mean()), 4),
    }
