"""The one inference core: a trained model with everything needed to use it, on any device.

``Classifier`` holds the model, its class names, the crop-resize recipe, the normalisation and the device.
Every command that predicts (evaluate, predict, explain, errors, review, benchmark) and the training loop's
validation go through it, so preprocessing and the model's input can never differ between them. Later
features attach here: ``temperature`` divides the logits before the softmax (1.0 = uncalibrated).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn

from bloodcell.data.images import ImageDecodeError, list_image_files, load_rgb
from bloodcell.data.recipe import Recipe, apply_recipe
from bloodcell.data.tensors import Normalizer, to_uint8_nchw
from bloodcell.errors import BloodcellError
from bloodcell.inference.weights import load_model, resolve_weights
from bloodcell.machine import resolve_device
from bloodcell.prediction import Prediction

# An image whose shorter side is under this fraction of the recipe's crop was not what the model saw in
# training (a 200 px crop of a ~360 px smear image); its prediction carries a warning.
SMALL_IMAGE_FRACTION = 0.5


class Classifier:
    """A trained model and its preprocessing; ``predict_files`` never stops at a bad file."""

    def __init__(self, model: nn.Module, *, class_names: list[str], recipe: Recipe,
                 normalization: dict | None = None, device: str | torch.device = "cpu", meta: dict | None = None,
                 temperature: float = 1.0, source: Path | None = None):
        self.device = resolve_device(device) if isinstance(device, str) else torch.device(device)
        self.model = model.to(self.device, memory_format=torch.channels_last)
        self.class_names = list(class_names)
        self.recipe = recipe
        self.normalization = normalization
        self.norm = Normalizer(**(normalization or {})).to(self.device)
        self.meta = dict(meta or {})
        self.temperature = float(temperature)
        self.source = source

    @classmethod
    def from_run(cls, run_or_file: str | Path, checkpoint: str = "best", device: str = "auto") -> Classifier:
        """Load a run folder's ``best``/``last`` weights, or a bare ``.safetensors`` file."""
        path = resolve_weights(run_or_file, checkpoint)
        model, meta = load_model(path)
        if Path(run_or_file).is_dir():
            check_against_config(meta, Path(run_or_file), path)
        recipe = Recipe.from_dict(meta["recipe"], where=str(path))
        if recipe.size != meta["input_size"]:
            recipe = Recipe(size=meta["input_size"], crop=recipe.crop)
        return cls(model, class_names=meta["class_names"], recipe=recipe, normalization=meta.get("normalization"),
                   device=device, meta=meta, source=path)

    @property
    def input_size(self) -> int:
        return self.recipe.size

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    # ------------------------------------------------------------ tensors in, tensors out (on the device)
    @torch.inference_mode()
    def logits(self, images: torch.Tensor, batch_size: int = 512) -> torch.Tensor:
        """Logits of a uint8 NCHW batch (any size, on any device), in eval mode, as a tensor on ``device``."""
        self.model.eval()
        if len(images) == 0:
            return torch.zeros(0, self.num_classes, device=self.device)
        out = [self.model(self.norm(images[i : i + batch_size].to(self.device, non_blocking=True)))
               for i in range(0, len(images), batch_size)]
        return torch.cat(out).float()

    def probabilities(self, images: torch.Tensor, batch_size: int = 512) -> torch.Tensor:
        """Softmax of the logits divided by ``temperature``, on ``device``."""
        return torch.softmax(self.logits(images, batch_size) / self.temperature, 1)

    # ------------------------------------------------------------ arrays and files (the host boundary)
    def predict_arrays(self, images: np.ndarray, batch_size: int = 512) -> np.ndarray:
        """N x H x W x 3 uint8 images already at the input size -> N x classes probabilities (NumPy)."""
        if images.ndim != 4 or images.shape[1:] != (self.input_size, self.input_size, 3):
            raise BloodcellError(f"expected N x {self.input_size} x {self.input_size} x 3 images, "
                                 f"got shape {images.shape}")
        return self.probabilities(to_uint8_nchw(images), batch_size).cpu().numpy()

    def preprocess(self, path: str | Path) -> tuple[np.ndarray, list[str]]:
        """A file as model input (the training recipe), with warnings about what makes it doubtful."""
        img = load_rgb(path)
        warnings = []
        if min(img.size) < SMALL_IMAGE_FRACTION * self.recipe.crop and img.size != (self.input_size,) * 2:
            warnings.append(f"image is {img.width}x{img.height}, much smaller than the {self.recipe.crop} px "
                            "crop the model was trained on; the result is unreliable")
        return apply_recipe(img, self.recipe), warnings

    def predict_files(self, paths: list[str | Path], top_k: int = 3, batch_size: int = 64) -> list[Prediction]:
        """Every image file under ``paths`` (folders recursively), in order; unreadable files get an error."""
        if top_k < 1:
            raise BloodcellError(f"--top-k must be at least 1, not {top_k}")
        files = list_image_files(paths)
        k = min(top_k, self.num_classes)
        results: list[Prediction] = []
        for start in range(0, len(files), batch_size):
            arrays, ok = [], []
            for f in files[start : start + batch_size]:
                try:
                    arr, warnings = self.preprocess(f)
                except ImageDecodeError as e:
                    results.append(Prediction(str(f), None, str(e)))
                    continue
                arrays.append(arr)
                ok.append((f, warnings))
            if not arrays:
                continue
            probs = self.predict_arrays(np.stack(arrays))
            for (f, warnings), pr in zip(ok, probs):
                if not np.isfinite(pr).all():
                    results.append(Prediction(str(f), None, "the model's output is not finite (diverged weights?)"))
                    continue
                order = np.argsort(-pr, kind="stable")[:k]
                results.append(Prediction(str(f), [(self.class_names[i], float(pr[i])) for i in order],
                                          warnings=warnings))
        index = {str(f): i for i, f in enumerate(files)}
        results.sort(key=lambda r: index.get(r.path, 0))
        return results


def check_against_config(meta: dict, run_dir: Path, weights: Path) -> None:
    """A run folder's weights must describe the model its ``config.json`` trained, with the classes its
    ``metrics.json`` recorded (so an edited file is refused even without its metadata digest)."""
    from bloodcell.io import read_json

    metrics = run_dir / "metrics.json"
    if metrics.is_file():
        recorded = (read_json(metrics) or {}).get("training", {}).get("class_names")
        if recorded is not None and recorded != meta["class_names"]:
            raise BloodcellError(f"{weights}: its class names {meta['class_names']} differ from the ones the run "
                                 f"trained with {recorded} ({metrics}); the file was edited or comes from another run")
    config = run_dir / "config.json"
    if not config.is_file():
        return
    cfg = read_json(config)
    if not isinstance(cfg, dict):
        raise BloodcellError(f"{config}: not a JSON object")
    for key, mkey in (("model", "model"), ("size", "input_size"), ("model_args", "model_args")):
        if key in cfg and cfg[key] != meta.get(mkey, {} if key == "model_args" else None):
            raise BloodcellError(f"{weights}: its {mkey} {meta.get(mkey)!r} differs from {key} {cfg[key]!r} in "
                                 f"{config}; the folder mixes two runs")
