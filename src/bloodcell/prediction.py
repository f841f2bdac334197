"""One file's prediction, shared by the PyTorch ``Classifier`` and the torch-free runtime (no torch here)."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class Prediction:
    """Classes with probabilities best first, or the reason the file could not be classified.

    ``warnings`` are doubts about the input (e.g. much smaller than the training crop); ``flags`` carry the trust
    signals (e.g. ``{"review": True, "ood_score": 3.2, "out_of_distribution": False, "conformal_set": [...]}``).
    """

    path: str
    top: list[tuple[str, float]] | None
    error: str | None = None
    warnings: list[str] = field(default_factory=list)
    flags: dict = field(default_factory=dict)
