"""The resumable training state (``state.pt``): saved atomically, loaded with ``weights_only=True``.

Weights files (safetensors) live in ``bloodcell.inference.weights``; this is only the loop's own state.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from bloodcell.errors import BloodcellError
from bloodcell.inference.weights import load_state
from bloodcell.io import atomic_write


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


def rng_state() -> dict:
    """The global generators dropout and init draw from: the CPU's, and every CUDA device's when present."""
    out = {"torch_rng": torch.get_rng_state()}
    if torch.cuda.is_available():
        out["cuda_rng"] = torch.cuda.get_rng_state_all()
    return out


def restore_training_state(state: dict, path: str | Path, model: nn.Module, optimizer: torch.optim.Optimizer,
                           gen: torch.Generator, scaler=None) -> None:
    """Put back weights, optimizer, generators (and the fp16 grad scaler); a state saved by another model
    fails by name, not traceback."""
    load_state(model, state["model"], path)
    try:
        optimizer.load_state_dict(state["optimizer"])
        gen.set_state(state["generator"])
        torch.set_rng_state(state["torch_rng"])
        if state.get("cuda_rng") is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda_rng"])
        if scaler is not None and state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
    except (ValueError, RuntimeError, KeyError, TypeError) as e:
        raise BloodcellError(f"{path}: the training state does not fit this run ({e})") from None
