"""The MedMNIST crop-resize recipe, shared by dataset preparation and prediction.

BloodMNIST was made from the PBC images by a centred 200x200 crop, then a resize. We resize with
PIL's bicubic filter, which is antialiased when shrinking (PIL widens the filter support by the
scale factor), so a 200->64 resize averages over every source pixel instead of aliasing.
The same function turns any new image into model input, so training and prediction cannot drift.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
from PIL import Image

RESAMPLE = Image.Resampling.BICUBIC


@dataclass(frozen=True)
class Recipe:
    """Centred ``crop`` x ``crop`` square, then an antialiased bicubic resize to ``size`` x ``size``."""

    size: int = 64
    crop: int = 200
    interpolation: str = "bicubic-antialiased (PIL)"

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> Recipe:
        return cls(size=int(d["size"]), crop=int(d["crop"]), interpolation=d.get("interpolation", cls.interpolation))


def centre_crop_box(width: int, height: int, crop: int) -> tuple[int, int, int, int]:
    """Box of the centred square: ``crop`` wide, or the shorter side when the image is smaller."""
    side = min(crop, width, height)
    left = (width - side) // 2
    top = (height - side) // 2
    return left, top, left + side, top + side


def apply_recipe(img: Image.Image, recipe: Recipe) -> np.ndarray:
    """RGB PIL image -> HxWx3 uint8 array at ``recipe.size``.

    An image already at the target size passes through unchanged, so a prepared 64x64 image and the
    original it came from give the same model input.
    """
    if img.size != (recipe.size, recipe.size):
        img = img.crop(centre_crop_box(img.width, img.height, recipe.crop))
        if img.size != (recipe.size, recipe.size):
            img = img.resize((recipe.size, recipe.size), RESAMPLE)
    return np.asarray(img, dtype=np.uint8)
