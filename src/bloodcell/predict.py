"""Classify image files with a trained run, using exactly the recipe the model was trained with."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from bloodcell.data.images import ImageDecodeError, list_image_files, load_rgb
from bloodcell.data.recipe import Recipe, apply_recipe
from bloodcell.data.tensors import Normalizer, to_uint8_nchw
from bloodcell.errors import BloodcellError
from bloodcell.training.checkpoint import load_model


@dataclass
class Prediction:
    path: str
    top: list[tuple[str, float]] | None  # (class, probability), best first
    error: str | None = None


class Predictor:
    """A trained model plus its preprocessing; ``predict_files`` never stops at a bad file."""

    def __init__(self, run_or_weights: str | Path, checkpoint: str = "best"):
        p = Path(run_or_weights)
        if not p.exists():
            raise BloodcellError(f"{p}: run folder or weights file not found")
        if p.is_dir():
            p = p / f"{checkpoint}.safetensors"
            if not p.is_file():
                raise BloodcellError(f"{p.parent}: no {checkpoint}.safetensors (is this a bloodcell run folder?)")
        self.model, self.meta = load_model(p)
        self.model = self.model.to(memory_format=torch.channels_last)
        self.class_names: list[str] = self.meta["class_names"]
        self.recipe = Recipe.from_dict(self.meta["recipe"])
        if self.recipe.size != int(self.meta["input_size"]):
            self.recipe = Recipe(size=int(self.meta["input_size"]), crop=self.recipe.crop)
        self.norm = Normalizer(**(self.meta.get("normalization") or {}))

    def preprocess(self, path: str | Path) -> np.ndarray:
        return apply_recipe(load_rgb(path), self.recipe)

    @torch.inference_mode()
    def predict_arrays(self, images: np.ndarray) -> np.ndarray:
        """NxHxWx3 uint8 (already at the input size) -> N x classes probabilities."""
        return torch.softmax(self.model(self.norm(to_uint8_nchw(images))), 1).numpy()

    def predict_files(self, paths: list[str | Path], top_k: int = 3, batch_size: int = 64) -> list[Prediction]:
        files = list_image_files(paths)
        results: list[Prediction] = []
        k = max(1, min(top_k, len(self.class_names)))
        for start in range(0, len(files), batch_size):
            chunk = files[start : start + batch_size]
            arrays, ok = [], []
            for f in chunk:
                try:
                    arrays.append(self.preprocess(f))
                    ok.append(f)
                except ImageDecodeError as e:
                    results.append(Prediction(str(f), None, str(e)))
            if not arrays:
                continue
            probs = self.predict_arrays(np.stack(arrays))
            for f, pr in zip(ok, probs):
                order = np.argsort(-pr)[:k]
                results.append(Prediction(str(f), [(self.class_names[i], float(pr[i])) for i in order]))
        index = {str(f): i for i, f in enumerate(files)}
        results.sort(key=lambda r: index.get(r.path, 0))
        return results
