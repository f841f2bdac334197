"""What a figure was measured on, and which device runs the model: shared by training, inference and reports."""

from __future__ import annotations

import os
import platform
from pathlib import Path

from bloodcell.choices import DEVICES
from bloodcell.errors import BloodcellError


def cpu_name() -> str:
    """The CPU model from /proc/cpuinfo (Linux), else what ``platform`` knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info() -> dict:
    import torch

    return {"cpu": cpu_name(), "cores": os.cpu_count(), "threads": torch.get_num_threads(),
            "torch": torch.__version__, "python": platform.python_version()}


def machine_load() -> float | None:
    """The 1-minute load average: above the thread count, other work competed for the CPU (None if unknown)."""
    try:
        return round(os.getloadavg()[0], 2)
    except (AttributeError, OSError):  # not on Windows
        return None


def set_threads(threads: int | None) -> int:
    """Use ``threads`` CPU threads (default: all cores); returns the number set."""
    import torch

    n = threads or os.cpu_count() or 1
    torch.set_num_threads(n)
    return n


def resolve_device(name: str | None = "auto"):
    """``auto`` (cuda, then mps, then cpu), or the named device, which must be present."""
    import torch

    name = (name or "auto").lower()
    kind = name.split(":", 1)[0]
    if kind not in DEVICES:
        raise BloodcellError(f"--device '{name}' is not one of {', '.join(DEVICES)}")
    mps = getattr(torch.backends, "mps", None)
    has_mps = bool(mps and mps.is_available())
    if kind == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "mps" if has_mps else "cpu")
    if kind == "cuda" and not torch.cuda.is_available():
        raise BloodcellError(f"--device cuda: no CUDA GPU is available to this PyTorch (torch {torch.__version__}, "
                             f"CUDA build {torch.version.cuda or 'none'}); use --device cpu")
    if kind == "mps" and not has_mps:
        raise BloodcellError("--device mps: Apple's Metal backend is not available here; use --device cpu")
    return torch.device(name)


def device_name(device) -> str:
    """A readable name of the hardware behind ``device``: 'cpu (AMD EPYC)', 'cuda:0 (NVIDIA A100 ...)'."""
    import torch

    device = torch.device(device)
    if device.type == "cuda":
        return f"{device} ({torch.cuda.get_device_name(device)})"
    if device.type == "cpu":
        return f"cpu ({cpu_name()})"
    return str(device)


def configure_determinism(device) -> None:
    """cuDNN settings that keep a seed repeatable on a GPU (no autotuned, nondeterministic kernels)."""
    import torch

    if torch.device(device).type == "cuda":
        torch.backends.cudnn.benchmark = False
        torch.backends.cudnn.deterministic = True
