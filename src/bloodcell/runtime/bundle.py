"""A deployment bundle's ``bundle.json``: its format, digests and checks, with no torch and no onnxruntime.

``bloodcell export`` writes the bundle (bloodcell.deploy); this module reads it back. bundle.json records a SHA-256
of every model file and of its own content, so a model file swapped or a class list edited after export is refused
with one line instead of silently changing answers.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from bloodcell.data.recipe import Recipe
from bloodcell.errors import BloodcellError
from bloodcell.io import file_sha256, read_json  # noqa: F401 - file_sha256 is part of this module's API

FORMAT = "bloodcell-bundle-1"
BUNDLE_JSON = "bundle.json"
MODEL_CARD = "MODEL_CARD.md"
MODEL_FILES = {"fp32": "model.onnx", "int8": "model.int8.onnx"}
PRECISIONS = tuple(MODEL_FILES)
INPUT_NAME, OUTPUT_NAME = "images", "logits"
DIGEST_KEY = "content_sha256"


def content_digest(bundle: dict) -> str:
    """SHA-256 of bundle.json's content without its own digest (key order and whitespace do not matter)."""
    body = {k: v for k, v in bundle.items() if k != DIGEST_KEY}
    return hashlib.sha256(json.dumps(body, sort_keys=True, allow_nan=False).encode()).hexdigest()


def is_bundle(path: str | Path) -> bool:
    """A folder with a bundle.json (what ``bloodcell export`` writes), as opposed to a run folder."""
    return (Path(path) / BUNDLE_JSON).is_file()


def read_bundle(folder: str | Path) -> dict:
    """bundle.json of ``folder``, checked: format, its content digest and every field inference relies on."""
    folder = Path(folder)
    if not folder.is_dir():
        raise BloodcellError(f"{folder}: bundle folder not found")
    path = folder / BUNDLE_JSON
    if not path.is_file():
        raise BloodcellError(f"{folder}: no {BUNDLE_JSON} (is this a folder written by 'bloodcell export'?)")
    b = read_json(path)
    if not isinstance(b, dict):
        raise BloodcellError(f"{path}: not a JSON object")
    if b.get("format") != FORMAT:
        raise BloodcellError(f"{path}: format {b.get('format')!r} is not {FORMAT!r} (not written by this version "
                             "of 'bloodcell export')")
    if b.get(DIGEST_KEY) != content_digest(b):
        raise BloodcellError(f"{path}: its content was changed after export (SHA-256 mismatch); class names, "
                             "recipe or thresholds may no longer match the model, so it is refused")
    check_fields(b, path)
    return b


def check_fields(b: dict, path: str | Path) -> None:
    """Each field the runtime uses is present and well-formed; one line naming the first that is not."""
    names = b.get("class_names")
    if (not isinstance(names, list) or len(names) < 2 or not all(isinstance(c, str) and c for c in names)
            or len(set(names)) != len(names)):
        raise BloodcellError(f"{path}: 'class_names' must be a list of at least 2 distinct names")
    size = b.get("input_size")
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise BloodcellError(f"{path}: 'input_size' must be a positive integer, not {size!r}")
    recipe_of(b, path)
    norm = b.get("normalization")
    if norm is not None:
        ok = isinstance(norm, dict) and all(
            isinstance(norm.get(k), list) and len(norm[k]) == 3
            and all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in norm[k]) for k in ("mean", "std"))
        if not ok or min(norm["std"]) <= 0:
            raise BloodcellError(f"{path}: 'normalization' must be null or {{mean: [3 numbers], std: [3 positive "
                                 "numbers]}")
    t = b.get("temperature")
    if t is not None and (isinstance(t, bool) or not isinstance(t, (int, float)) or not 0 < t < float("inf")):
        raise BloodcellError(f"{path}: 'temperature' must be null or a positive number, not {t!r}")
    models = b.get("models")
    if not isinstance(models, dict) or "fp32" not in models:
        raise BloodcellError(f"{path}: 'models' must list at least the fp32 model")
    for precision, entry in models.items():
        if precision not in MODEL_FILES or not isinstance(entry, dict):
            raise BloodcellError(f"{path}: unknown model entry {precision!r} (known: {', '.join(PRECISIONS)})")
        if entry.get("file") != MODEL_FILES[precision] or not isinstance(entry.get("sha256"), str):
            raise BloodcellError(f"{path}: model entry {precision!r} must name {MODEL_FILES[precision]} and its "
                                 "sha256")


def recipe_of(b: dict, path: str | Path) -> Recipe:
    recipe = Recipe.from_dict(b.get("recipe"), where=str(path))
    size = b.get("input_size")
    return recipe if recipe.size == size else Recipe(size=size, crop=recipe.crop)


def model_file(folder: str | Path, b: dict, precision: str) -> Path:
    """The bundle's model file for ``precision``, present and with the SHA-256 bundle.json recorded."""
    folder = Path(folder)
    if precision not in PRECISIONS:
        raise BloodcellError(f"precision must be one of {', '.join(PRECISIONS)}, not {precision!r}")
    entry = b["models"].get(precision)
    if entry is None:
        hint = " (export it with 'bloodcell export RUN --int8')" if precision == "int8" else ""
        raise BloodcellError(f"{folder}: the bundle has no {precision} model{hint}")
    path = folder / entry["file"]
    if not path.is_file():
        raise BloodcellError(f"{path}: model file missing from the bundle")
    if file_sha256(path) != entry["sha256"]:
        raise BloodcellError(f"{path}: the file changed after export (SHA-256 differs from {BUNDLE_JSON}); "
                             "re-export the bundle")
    return path
