"""Weights files: safetensors tensors plus the JSON metadata needed to rebuild and use the model.

Nothing here unpickles. The metadata carries its own SHA-256, so a file whose metadata was edited after
training (class names renamed or reordered, recipe changed) is refused instead of silently changing answers.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, safe_open, save_file
from torch import nn

from bloodcell.choices import CHECKPOINTS
from bloodcell.errors import BloodcellError
from bloodcell.io import atomic_write

FORMAT = "bloodcell-weights-1"


def meta_digest(meta: dict) -> str:
    return hashlib.sha256(json.dumps(meta, sort_keys=True).encode()).hexdigest()


def save_weights(path: str | Path, model: nn.Module, meta: dict) -> None:
    """State dict (parameters and BatchNorm statistics, always as CPU tensors) + metadata + its digest."""
    tensors = {k: v.detach().to("cpu", copy=True).contiguous() for k, v in model.state_dict().items()}
    header = {"format": FORMAT, "bloodcell": json.dumps(meta), "bloodcell_sha256": meta_digest(meta)}
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=header))


def read_weights(path: str | Path) -> tuple[dict[str, torch.Tensor], dict]:
    """Tensors and checked metadata of a weights file, or a one-line error naming what is wrong with it."""
    path = Path(path)
    if not path.is_file():
        raise BloodcellError(f"{path}: weights file not found")
    try:
        with safe_open(str(path), framework="pt") as f:
            header = f.metadata() or {}
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise BloodcellError(f"{path}: corrupt or not a safetensors weights file ({e})") from None
    if header.get("format") != FORMAT or "bloodcell" not in header:
        raise BloodcellError(f"{path}: safetensors file without bloodcell metadata (not saved by bloodcell)")
    try:
        meta = json.loads(header["bloodcell"])
    except json.JSONDecodeError:
        raise BloodcellError(f"{path}: bloodcell metadata is not valid JSON") from None
    digest = header.get("bloodcell_sha256")  # files from before the digest existed have none
    if digest is not None and isinstance(meta, dict) and digest != meta_digest(meta):
        raise BloodcellError(f"{path}: its metadata was changed after training (digest mismatch); class names, "
                             "recipe or normalisation no longer match the weights, so it is refused")
    check_meta(meta, path)
    return tensors, meta


def check_meta(meta, path: str | Path) -> None:
    """Every field inference relies on is present and well-formed; one line naming the first that is not."""
    if not isinstance(meta, dict):
        raise BloodcellError(f"{path}: bloodcell metadata is not a JSON object")
    for key in ("model", "class_names", "input_size", "recipe"):
        if key not in meta:
            raise BloodcellError(f"{path}: metadata lacks '{key}'")
    names = meta["class_names"]
    if (not isinstance(names, list) or len(names) < 2 or not all(isinstance(c, str) and c for c in names)
            or len(set(names)) != len(names)):
        raise BloodcellError(f"{path}: metadata 'class_names' must be a list of at least 2 distinct names")
    if not isinstance(meta["model"], str) or not isinstance(meta.get("model_args", {}), dict):
        raise BloodcellError(f"{path}: metadata 'model' must be a name and 'model_args' an object")
    size = meta["input_size"]
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise BloodcellError(f"{path}: metadata 'input_size' must be a positive integer, not {size!r}")
    recipe = meta["recipe"]
    if not isinstance(recipe, dict):
        raise BloodcellError(f"{path}: metadata 'recipe' must be an object with size and crop")
    for key in ("size", "crop"):
        v = recipe.get(key)
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise BloodcellError(f"{path}: metadata recipe '{key}' must be a positive integer, not {v!r}")
    norm = meta.get("normalization")
    if norm is not None:
        ok = isinstance(norm, dict) and all(
            isinstance(norm.get(k), list) and len(norm[k]) == 3
            and all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in norm[k]) for k in ("mean", "std"))
        if not ok or min(norm["std"]) <= 0:
            raise BloodcellError(f"{path}: metadata 'normalization' must be null or {{mean: [3 numbers], "
                                 "std: [3 positive numbers]}")


def load_state(model: nn.Module, tensors: dict[str, torch.Tensor], path: str | Path) -> None:
    """Load ``tensors`` into ``model``; a mismatch of names or shapes is a one-line error."""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    if missing or unexpected:
        raise BloodcellError(
            f"{path}: weights do not match the model (missing {missing[:3]}, unexpected {unexpected[:3]})"
        )
    for k, v in tensors.items():
        if v.shape != expected[k].shape:
            raise BloodcellError(
                f"{path}: weight '{k}' has shape {tuple(v.shape)}, the model expects {tuple(expected[k].shape)}"
            )
    model.load_state_dict(tensors)


def load_model(path: str | Path) -> tuple[nn.Module, dict]:
    """Rebuild the model named in the file's metadata and load its weights, on the CPU in eval mode."""
    from bloodcell.models import create_model

    tensors, meta = read_weights(path)
    model = create_model(meta["model"], num_classes=len(meta["class_names"]), input_size=meta["input_size"],
                         **meta.get("model_args", {}))
    load_state(model, tensors, path)
    return model.eval(), meta


def resolve_weights(run_or_file: str | Path, checkpoint: str = "best") -> Path:
    """The weights file of a run folder (``best``/``last``), or a ``.safetensors`` file given directly."""
    p = Path(run_or_file)
    if checkpoint not in CHECKPOINTS:
        raise BloodcellError(f"--checkpoint must be one of {', '.join(CHECKPOINTS)}, not '{checkpoint}'")
    if not p.exists():
        raise BloodcellError(f"{p}: run folder or weights file not found")
    if p.is_dir():
        w = p / f"{checkpoint}.safetensors"
        if not w.is_file():
            raise BloodcellError(f"{p}: no {checkpoint}.safetensors (is this a finished bloodcell run folder?)")
        return w
    return p
