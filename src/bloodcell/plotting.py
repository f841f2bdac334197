"""The one way bloodcell writes a figure: matplotlib without a display, saved atomically as PNG."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from bloodcell.io import atomic_write  # noqa: E402

__all__ = ["plt", "save_figure"]


def save_figure(fig, path: str | Path, dpi: int = 120) -> Path:
    """Write ``fig`` to ``path`` (a half-written file never replaces a good one) and close it."""
    path = Path(path)
    try:
        atomic_write(path, lambda tmp: fig.savefig(tmp, format=path.suffix.lstrip(".") or "png", dpi=dpi,
                                                   bbox_inches="tight"))
    finally:
        plt.close(fig)
    return path
