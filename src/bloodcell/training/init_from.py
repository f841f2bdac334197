"""``--init-from RUN|FILE``: start a run from another run's weights, or any local state dict, loading what fits.

Fine-tuning to another class count, dataset or image size keeps whatever carries over: every tensor whose name
and shape match the new model is copied; the rest (the classifier head when the class count differs, say) keep
their fresh initialisation and are reported by name, in the log and in metrics.json. A run folder gives its best
weights, found by the inference core's one resolution (``resolve_weights``). Nothing is unpickled: safetensors
files, or a ``.pt``/``.pth`` state dict read with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from bloodcell.errors import BloodcellError, one_line
from bloodcell.inference import resolve_weights

TORCH_SUFFIXES = (".pt", ".pth")
LOGGED_NAMES = 8  # the log names this many skipped tensors; metrics.json names them all


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file (bloodcell's or any other), or of a ``.pt``/``.pth`` state dict."""
    tensors = _read_torch(path) if path.suffix in TORCH_SUFFIXES else _read_safetensors(path)
    if not tensors:
        raise BloodcellError(f"--init-from {path}: holds no tensors")
    return tensors


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise BloodcellError(f"--init-from {path}: not a safetensors weights file (nor a .pt/.pth state dict): "
                             f"{one_line(e)}") from None


def _read_torch(path: Path) -> dict[str, torch.Tensor]:
    """A flat name -> tensor mapping, or one under "state_dict"/"model" (bloodcell's own state.pt)."""
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # unpickling refused, zip errors: a foreign or corrupt file
        raise BloodcellError(f"--init-from {path}: not a state dict torch can read without unpickling code "
                             f"({type(e).__name__})") from None
    for key in ("state_dict", "model"):
        if isinstance(sd, dict) and isinstance(sd.get(key), dict):
            sd = sd[key]
    if not isinstance(sd, dict) or not all(isinstance(k, str) and torch.is_tensor(v) for k, v in sd.items()):
        raise BloodcellError(f"--init-from {path}: not a state dict (a mapping of names to tensors)")
    return sd


def fitting_tensors(model: nn.Module, tensors: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], list[str]]:
    """The tensors whose names and shapes match ``model``'s, and the names of the model's that get none."""
    expected = model.state_dict()
    fit = {k: v for k, v in tensors.items() if k in expected and tuple(v.shape) == tuple(expected[k].shape)}
    return fit, sorted(set(expected) - set(fit))


def init_from(model: nn.Module, source: str | Path) -> dict:
    """Load into ``model`` every tensor of ``source`` (a run folder or weights file) that fits it; return what was
    loaded and skipped. Nothing fitting at all is an error: it is a different architecture, not a fine-tune."""
    try:
        path = resolve_weights(source, "best")
    except BloodcellError as e:
        raise BloodcellError(f"--init-from: {e}") from None
    tensors = read_state_dict(path)
    fit, skipped = fitting_tensors(model, tensors)
    if not fit:
        raise BloodcellError(f"--init-from {path}: none of its {len(tensors)} tensors matches a tensor of this model "
                             "by name and shape (weights of another architecture?)")
    model.load_state_dict(fit, strict=False)
    return {"source": str(path), "loaded": len(fit), "skipped": skipped, "unused": len(tensors) - len(fit)}


def describe(report: dict) -> str:
    """One log line: how much was loaded, and which of the model's tensors kept their initialisation."""
    total = report["loaded"] + len(report["skipped"])
    names = report["skipped"][:LOGGED_NAMES]
    more = f" and {len(report['skipped']) - LOGGED_NAMES} more" if len(report["skipped"]) > LOGGED_NAMES else ""
    kept = f"; freshly initialised: {', '.join(names)}{more}" if names else ""
    unused = f"; {report['unused']} of its tensors unused" if report["unused"] else ""
    return f"initialised from {report['source']}: {report['loaded']} of {total} tensors loaded{kept}{unused}"
