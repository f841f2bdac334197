"""Weights as safetensors with JSON metadata, and the resumable training state; all writes atomic.

Nothing here unpickles: weights load with safetensors, training state with ``weights_only=True``.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, safe_open, save_file
from torch import nn

from bloodcell.errors import BloodcellError
from bloodcell.io import atomic_write

FORMAT = "bloodcell-weights-1"


def save_weights(path: str | Path, model: nn.Module, meta: dict) -> None:
    """State dict (parameters and BatchNorm statistics) + metadata needed to rebuild and use the model."""
    tensors = {k: v.detach().contiguous().clone() for k, v in model.state_dict().items()}
    header = {"format": FORMAT, "bloodcell": json.dumps(meta)}
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=header))


def read_weights(path: str | Path) -> tuple[dict[str, torch.Tensor], dict]:
    """Tensors and metadata of a weights file, or a one-line error naming what is wrong with it."""
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
    return tensors, meta


def load_model(path: str | Path) -> tuple[nn.Module, dict]:
    """Rebuild the model named in the file's metadata and load its weights, in eval mode."""
    from bloodcell.models import create_model

    tensors, meta = read_weights(path)
    try:
        model = create_model(
            meta["model"], num_classes=len(meta["class_names"]), input_size=int(meta["input_size"]),
            **meta.get("model_args", {}),
        )
    except KeyError as e:
        raise BloodcellError(f"{path}: metadata lacks {e}") from None
    load_state(model, tensors, path)
    return model.eval(), meta


def load_state(model: nn.Module, tensors: dict[str, torch.Tensor], path: str | Path) -> None:
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


def save_state(path: str | Path, state: dict) -> None:
    atomic_write(path, lambda tmp: torch.save(state, tmp))


def load_state_file(path: str | Path, required: tuple[str, ...] = ()) -> dict:
    """A saved training state, checked for the ``required`` keys so a truncated one fails here, by name."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise BloodcellError(f"{path}: no training state to resume from") from None
    except Exception as e:  # pickle/zip errors: a corrupt or foreign file
        raise BloodcellError(f"{path}: corrupt training state ({type(e).__name__}: {e})") from None
    missing = [k for k in required if not isinstance(state, dict) or k not in state]
    if missing:
        raise BloodcellError(f"{path}: corrupt training state (it lacks {missing}); delete it to start afresh")
    return state


def restore_training_state(state: dict, path: str | Path, model: nn.Module, optimizer: torch.optim.Optimizer,
                           gen: torch.Generator) -> None:
    """Put back weights, optimizer and generators; a state saved by another model fails by name, not traceback."""
    load_state(model, state["model"], path)
    try:
        optimizer.load_state_dict(state["optimizer"])
        gen.set_state(state["generator"])
        torch.set_rng_state(state["torch_rng"])
    except (ValueError, RuntimeError, KeyError, TypeError) as e:
        raise BloodcellError(f"{path}: the training state does not fit this run ({e})") from None
