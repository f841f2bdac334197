"""Temperature scaling (Guo et al. 2017) and the calibration metrics: ECE, MCE, NLL and Brier score.

Why temperature scaling: one scalar fitted by NLL on held-out logits leaves the argmax, hence the accuracy,
unchanged, and fixes most of the over-confidence of a network trained to zero training loss. Logits may carry
a leading axis of test-time-augmentation views, ``(V, N, K)``: the probability is then the mean over the views of
``softmax(z / T)``, and the temperature is fitted for exactly that average.
"""

from __future__ import annotations

import math

import numpy as np
from scipy.optimize import minimize_scalar
from scipy.special import log_softmax, logsumexp
from sklearn.metrics import brier_score_loss, log_loss

from bloodcell.errors import BloodcellError

ECE_BINS = 15
TEMPERATURE_BOUNDS = (0.05, 20.0)


def _views(logits: np.ndarray) -> np.ndarray:
    z = np.asarray(logits, dtype=np.float64)
    if z.ndim == 2:
        z = z[None]
    if z.ndim != 3:
        raise BloodcellError(f"expected logits of shape (N, K) or (views, N, K), got {z.shape}")
    return z


def mean_log_probabilities(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """log of the view-averaged ``softmax(z / T)``, (N, K), computed stably."""
    z = _views(logits)
    return logsumexp(log_softmax(z / temperature, axis=-1), axis=0) - math.log(z.shape[0])


def mean_probabilities(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """The view-averaged ``softmax(z / T)``, (N, K)."""
    return np.exp(mean_log_probabilities(logits, temperature))


def nll(logits: np.ndarray, labels: np.ndarray, temperature: float = 1.0) -> float:
    lp = mean_log_probabilities(logits, temperature)
    return float(-lp[np.arange(len(lp)), np.asarray(labels)].mean())


def fit_temperature(logits: np.ndarray, labels: np.ndarray) -> float:
    """The temperature minimising the NLL of ``labels`` (searched on log T in [0.05, 20])."""
    labels = np.asarray(labels).reshape(-1)
    z = _views(logits)
    if z.shape[1] != len(labels) or len(labels) == 0:
        raise BloodcellError(f"temperature scaling needs one label per image, got {len(labels)} labels for "
                             f"{z.shape[1]} images")
    if not np.isfinite(z).all():
        raise BloodcellError("temperature scaling: the logits are not all finite (diverged weights?)")
    lo, hi = (math.log(b) for b in TEMPERATURE_BOUNDS)
    res = minimize_scalar(lambda t: nll(z, labels, math.exp(t)), bounds=(lo, hi), method="bounded",
                          options={"xatol": 1e-5})
    return float(math.exp(res.x))


def reliability_bins(probs: np.ndarray, labels: np.ndarray, n_bins: int = ECE_BINS) -> dict:
    """Per equal-width confidence bin ((m-1)/M, m/M]: image count, mean confidence and accuracy."""
    probs = np.asarray(probs, dtype=np.float64)
    conf = probs.max(1)
    correct = (probs.argmax(1) == np.asarray(labels).reshape(-1)).astype(np.float64)
    idx = np.clip(np.ceil(conf * n_bins).astype(int) - 1, 0, n_bins - 1)
    count = np.bincount(idx, minlength=n_bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_conf = np.bincount(idx, conf, n_bins) / count
        acc = np.bincount(idx, correct, n_bins) / count
    return {"edges": np.linspace(0, 1, n_bins + 1), "count": count, "confidence": mean_conf, "accuracy": acc}


def calibration_metrics(probs: np.ndarray, labels: np.ndarray, n_bins: int = ECE_BINS) -> dict:
    """ECE and maximum calibration error (equal-width bins, top-1 confidence), NLL (scikit-learn's log loss)
    and the multi-class Brier score (sum over classes, scikit-learn), with the bins for a reliability diagram."""
    probs = np.asarray(probs, dtype=np.float64)
    labels = np.asarray(labels).reshape(-1)
    b = reliability_bins(probs, labels, n_bins)
    gap = np.abs(b["accuracy"] - b["confidence"])
    used = b["count"] > 0
    k = probs.shape[1]
    return {
        "ece": float((gap[used] * b["count"][used]).sum() / max(1, len(labels))),
        "mce": float(gap[used].max()) if used.any() else 0.0,
        "nll": float(log_loss(labels, np.clip(probs, 1e-15, 1), labels=list(range(k)))),
        "brier": float(brier_score_loss(labels, probs, labels=list(range(k)), scale_by_half=False)),
        "mean_confidence": float(probs.max(1).mean()),
        "accuracy": float((probs.argmax(1) == labels).mean()),
        "bins": {"count": b["count"].tolist(), "confidence": _finite_or_none(b["confidence"]),
                 "accuracy": _finite_or_none(b["accuracy"])},  # None for an empty bin
    }


def _finite_or_none(values: np.ndarray) -> list[float | None]:
    return [float(v) if np.isfinite(v) else None for v in values]
