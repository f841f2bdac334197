"""The MedMNIST crop-resize recipe, shared by dataset preparation and prediction.

BloodMNIST was made from the PBC images by a centred 200x200 crop, then a resize. We resize with
PIL's bicubic filter, which is antialiased when shrinking (PIL widens the filter support by the
scale factor), so a 200->64 resize averages over every source pixel instead of aliasing.
The same function turns any new image into model input, so training and prediction cannot drift.
"""

from __future__ import annotations

import warnings
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from PIL import Image

from bloodcell.errors import BloodcellError

RESAMPLE = Image.Resampling.BICUBIC
INTERPOLATION = "bicubic-antialiased (PIL)"


def _pixels(value: Any, field: str, where: str) -> int:
    """``value`` as a positive int, or a one-line error naming ``field`` (bools and 2.5 are not pixel counts).

    Without ``where`` the value came from the caller (the CLI's ``--crop``/``--size``), so the option is named.
    """
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)) or value < 1:
        what = f"{where}recipe {field}" if where else f"{field} (--{field})"
        raise BloodcellError(f"{what} must be a positive whole number of pixels, got {value!r}")
    return int(value)


@dataclass(frozen=True)
class Recipe:
    """Centred ``crop`` x ``crop`` square, then an antialiased bicubic resize to ``size`` x ``size``.

    ``crop`` larger than an image's shorter side crops that shorter side instead (the largest centred
    square the image has), so 200 works for images of any size; ``size`` may be larger than the crop
    (the square is then enlarged).
    """

    size: int = 64
    crop: int = 200
    interpolation: str = INTERPOLATION

    def __post_init__(self) -> None:
        # A crop of 0 gave all-black images and a negative one a traceback deep inside PIL.
        object.__setattr__(self, "size", _pixels(self.size, "size", ""))
        object.__setattr__(self, "crop", _pixels(self.crop, "crop", ""))
        if self.interpolation != INTERPOLATION:
            raise BloodcellError(f"recipe interpolation {self.interpolation!r} is not supported "
                                 f"(this version resizes with {INTERPOLATION!r})")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Any, where: str = "") -> Recipe:
        """A recipe from its stored dict (e.g. a weights file's metadata); ``where`` prefixes any error."""
        prefix = f"{where}: " if where else ""
        if not isinstance(d, dict):
            raise BloodcellError(f"{prefix}recipe must be a mapping with size and crop, got {type(d).__name__}")
        for key in ("size", "crop"):
            if key not in d:
                raise BloodcellError(f"{prefix}recipe has no '{key}' (found: {', '.join(map(str, d)) or 'nothing'})")
        interpolation = d.get("interpolation", INTERPOLATION)
        if interpolation != INTERPOLATION:
            raise BloodcellError(f"{prefix}recipe interpolation {interpolation!r} is not supported "
                                 f"(this version resizes with {INTERPOLATION!r})")
        return cls(size=_pixels(d["size"], "size", prefix), crop=_pixels(d["crop"], "crop", prefix))


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
        with warnings.catch_warnings():  # PIL re-checks the pixel limit on crop; load_rgb already said it once
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = img.crop(centre_crop_box(img.width, img.height, recipe.crop))
        if img.size != (recipe.size, recipe.size):
            img = img.resize((recipe.size, recipe.size), RESAMPLE)
    return np.asarray(img, dtype=np.uint8)
