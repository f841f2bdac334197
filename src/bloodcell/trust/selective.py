"""Abstention for a human in the loop: the risk-coverage curve and the confidence threshold for a target accuracy.

Accepting only predictions with confidence >= t trades coverage (the share accepted) for risk (the error rate
among them). Images with equal confidence are accepted or refused together, so the curve has one point per
distinct confidence. The area under it (AURC, Geifman et al. 2019) is the mean risk over all coverages.
"""

from __future__ import annotations

import numpy as np

from bloodcell.errors import BloodcellError


def _sorted_groups(conf: np.ndarray, correct: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Distinct confidences (descending), and the accepted count and correct count at each as threshold."""
    conf = np.asarray(conf, dtype=np.float64).reshape(-1)
    correct = np.asarray(correct, dtype=bool).reshape(-1)
    if len(conf) != len(correct) or len(conf) == 0:
        raise BloodcellError(f"risk-coverage needs one correctness per confidence, got {len(conf)} and "
                             f"{len(correct)}")
    order = np.argsort(-conf, kind="stable")
    c, ok = conf[order], correct[order]
    ends = np.flatnonzero(np.r_[c[1:] != c[:-1], True])  # last index of each group of equal confidence
    return c[ends], ends + 1, np.cumsum(ok)[ends]


def risk_coverage(conf: np.ndarray, correct: np.ndarray) -> dict:
    """Coverage and risk at every distinct threshold, and the area under the curve (AURC, lower is better)."""
    thresholds, accepted, right = _sorted_groups(conf, correct)
    n = len(np.asarray(conf).reshape(-1))
    risk = 1 - right / accepted
    # AURC as the mean over images of the risk when the threshold is that image's confidence (ties share a value)
    widths = np.diff(np.r_[0, accepted])
    return {"threshold": thresholds, "coverage": accepted / n, "risk": risk,
            "aurc": float((risk * widths).sum() / n)}


def threshold_for_accuracy(conf: np.ndarray, correct: np.ndarray, target: float) -> float | None:
    """The lowest confidence threshold whose accepted images reach ``target`` accuracy (0.0 when all do);
    None when no threshold reaches it (then every prediction needs review)."""
    if not 0 < target <= 1:
        raise BloodcellError(f"a target accuracy must be in (0, 1], got {target}")
    thresholds, accepted, right = _sorted_groups(conf, correct)
    ok = np.flatnonzero(right / accepted >= target)
    if len(ok) == 0:
        return None
    if ok[-1] == len(thresholds) - 1:
        return 0.0
    return float(thresholds[ok[-1]])


def selective_at(conf: np.ndarray, correct: np.ndarray, threshold: float | None) -> dict:
    """Coverage and accuracy of the predictions with confidence >= ``threshold`` (None: none accepted)."""
    conf = np.asarray(conf, dtype=np.float64).reshape(-1)
    correct = np.asarray(correct, dtype=bool).reshape(-1)
    take = np.zeros_like(correct) if threshold is None else conf >= threshold
    n = int(take.sum())
    return {"threshold": threshold, "coverage": float(n / max(1, len(conf))), "accepted": n,
            "accuracy": float(correct[take].mean()) if n else None}
