"""Split conformal prediction sets (Vovk et al.; Angelopoulos & Bates, *A gentle introduction*, 2021).

A nonconformity score for every class is computed from the calibrated probabilities; the ``ceil((n+1)(1-alpha))``-th
smallest score of the true class over ``n`` validation images is the quantile ``q``; a test image's set holds
every class scoring at most ``q``, and contains the true class with probability at least ``1 - alpha`` (marginal
over exchangeable images). ``lac`` (score ``1 - p``; Sadinle et al. 2019) gives the smallest sets on average;
``aps`` (cumulative probability of the classes at least as likely; Romano et al. 2020, non-randomised) adapts the
set size to the image's difficulty. The sets are the same as crepes' ``ConformalClassifier`` with unsmoothed
p-values (tests/test_trust.py checks it), computed with one vectorised comparison instead of crepes' loop over
images and classes.
"""

from __future__ import annotations

import math

import numpy as np

from bloodcell.choices import CONFORMAL_METHODS
from bloodcell.errors import BloodcellError


def nonconformity(probs: np.ndarray, method: str = "lac") -> np.ndarray:
    """(N, K) scores of every class; lower = more conforming."""
    probs = np.asarray(probs, dtype=np.float64)
    if method == "lac":
        return 1.0 - probs
    if method == "aps":
        order = np.argsort(-probs, axis=1, kind="stable")
        cum = np.cumsum(np.take_along_axis(probs, order, 1), axis=1)
        out = np.empty_like(probs)
        np.put_along_axis(out, order, cum, 1)
        return np.minimum(out, 1.0)
    raise BloodcellError(f"unknown conformal method '{method}' ({', '.join(CONFORMAL_METHODS)})")


def true_class_scores(probs: np.ndarray, labels: np.ndarray, method: str = "lac") -> np.ndarray:
    labels = np.asarray(labels).reshape(-1)
    return nonconformity(probs, method)[np.arange(len(labels)), labels]


def conformal_quantile(cal_scores: np.ndarray, alpha: float) -> float:
    """The ``ceil((n+1)(1-alpha))``-th smallest calibration score (infinite when n is too small for ``alpha``)."""
    if not 0 < alpha < 1:
        raise BloodcellError(f"a conformal alpha must be between 0 and 1 (e.g. 0.01 for 99% sets), got {alpha}")
    s = np.sort(np.asarray(cal_scores, dtype=np.float64).reshape(-1))
    k = math.ceil((len(s) + 1) * (1 - alpha) - 1e-9)  # the tolerance: 100 * 0.9 is 90.00000000000001
    return math.inf if k > len(s) else float(s[k - 1])


def prediction_sets(probs: np.ndarray, q: float, method: str = "lac") -> np.ndarray:
    """(N, K) boolean membership of each class in each image's set."""
    return nonconformity(probs, method) <= q + 1e-12


def coverage_and_size(sets: np.ndarray, labels: np.ndarray) -> dict:
    labels = np.asarray(labels).reshape(-1)
    size = sets.sum(1)
    return {"coverage": float(sets[np.arange(len(labels)), labels].mean()), "mean_set_size": float(size.mean()),
            "singleton_share": float((size == 1).mean()), "empty_share": float((size == 0).mean())}
