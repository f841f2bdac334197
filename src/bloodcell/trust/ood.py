"""Out-of-distribution scores (higher = less like the training cells) and the statistics they need.

``msp``: minus the maximum calibrated probability (Hendrycks & Gimpel 2017). ``energy``: minus the log-sum-exp
of the logits (Liu et al. 2020). Both only see the logits, which a network can push to any value far from its
training data. ``mahalanobis`` (Lee et al. 2018) and ``knn`` (Sun et al. 2022) look at the penultimate features
(the input of the last linear layer) instead: they are L2-normalised, reduced by a PCA fitted on the training
features, then scored by the smallest Mahalanobis distance to a class mean (shared Ledoit-Wolf covariance), or by
the Euclidean distance to the k-th nearest training image. On the PBC data the logit scores fail outright (photos
and noise get *higher* confidence than cells) and Mahalanobis separates best (docs/trust.md). Fitting uses
scikit-learn; scoring is plain NumPy, so a stored ``FeatureStats`` scores new images without scikit-learn.
"""

from __future__ import annotations

import numpy as np
from scipy.special import logsumexp
from sklearn.covariance import LedoitWolf
from sklearn.decomposition import PCA
from sklearn.metrics import roc_auc_score

from bloodcell.choices import OOD_METHODS
from bloodcell.errors import BloodcellError

FEATURE_METHODS = ("mahalanobis", "knn")
PCA_DIM = 128
KNN_K = 10


def msp_score(probs: np.ndarray) -> np.ndarray:
    return -np.asarray(probs, dtype=np.float64).max(1)


def energy_score(logits: np.ndarray) -> np.ndarray:
    """Energy of the (view-averaged) logits, ``-logsumexp(z)``."""
    return -logsumexp(np.asarray(logits, dtype=np.float64), axis=1)


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


class FeatureStats:
    """What the feature scores need from the training images: PCA, class means, precision, the kNN bank."""

    KEYS = ("mean", "components", "class_means", "precision", "bank")

    def __init__(self, mean: np.ndarray, components: np.ndarray, class_means: np.ndarray, precision: np.ndarray,
                 bank: np.ndarray, k: int = KNN_K, explained: float | None = None):
        self.mean, self.components = np.asarray(mean, np.float32), np.asarray(components, np.float32)
        self.class_means, self.precision = np.asarray(class_means, np.float64), np.asarray(precision, np.float64)
        self.bank, self.k, self.explained = np.asarray(bank, np.float32), int(k), explained

    @classmethod
    def fit(cls, features: np.ndarray, labels: np.ndarray, dim: int = PCA_DIM, k: int = KNN_K,
            seed: int = 0) -> FeatureStats:
        """Fit on the training features (N, D) and labels; ``dim`` PCA components at most."""
        f = _unit(np.asarray(features, dtype=np.float32))
        labels = np.asarray(labels).reshape(-1)
        if len(f) != len(labels) or len(f) < 3:
            raise BloodcellError(f"feature statistics need at least 3 labelled images, got {len(f)}")
        dim = int(min(dim, f.shape[1], len(f) - 1))
        pca = PCA(n_components=dim, svd_solver="randomized" if dim < min(f.shape) // 2 else "full",
                  random_state=seed).fit(f)
        z = pca.transform(f)
        classes = np.unique(labels)
        means = np.zeros((int(labels.max()) + 1, dim))
        for c in classes:
            means[c] = z[labels == c].mean(0)
        present = np.isin(np.arange(len(means)), classes)
        means[~present] = np.nan  # a class the training split lacks: never the nearest mean
        precision = LedoitWolf().fit(z - means[labels]).precision_
        return cls(pca.mean_, pca.components_, means, precision, z, k, float(pca.explained_variance_ratio_.sum()))

    def project(self, features: np.ndarray) -> np.ndarray:
        f = _unit(np.asarray(features, dtype=np.float32))
        if f.shape[1] != self.mean.shape[0]:
            raise BloodcellError(f"features of width {f.shape[1]} do not match the stored statistics "
                                 f"({self.mean.shape[0]}); the model is not the one calibrated")
        return (f - self.mean) @ self.components.T

    def mahalanobis(self, features: np.ndarray) -> np.ndarray:
        """Squared Mahalanobis distance to the nearest class mean."""
        z = self.project(features).astype(np.float64)
        d = z[:, None, :] - self.class_means[None]  # N x K x d
        m = np.einsum("nkd,de,nke->nk", d, self.precision, d)
        return np.nanmin(m, axis=1)

    def knn(self, features: np.ndarray, chunk: int = 1024) -> np.ndarray:
        """Euclidean distance to the k-th nearest training image (in the PCA space of the normalised features)."""
        z = self.project(features)
        k = min(self.k, len(self.bank))
        bank_sq = (self.bank.astype(np.float64) ** 2).sum(1)
        out = np.empty(len(z))
        for i in range(0, len(z), chunk):  # chunks of images bound the N x bank distance matrix
            zc = z[i : i + chunk].astype(np.float64)
            d2 = (zc**2).sum(1, keepdims=True) - 2 * zc @ self.bank.T.astype(np.float64) + bank_sq[None]
            out[i : i + chunk] = np.sqrt(np.partition(d2, k - 1, axis=1)[:, k - 1].clip(0))
        return out

    def score(self, method: str, features: np.ndarray) -> np.ndarray:
        if method == "mahalanobis":
            return self.mahalanobis(features)
        if method == "knn":
            return self.knn(features)
        raise BloodcellError(f"'{method}' is not a feature-space OOD method ({', '.join(FEATURE_METHODS)})")

    def arrays(self) -> dict[str, np.ndarray]:
        return {"mean": self.mean, "components": self.components, "class_means": self.class_means,
                "precision": self.precision, "bank": self.bank}

    @classmethod
    def from_arrays(cls, arrays: dict[str, np.ndarray], k: int = KNN_K, explained: float | None = None) -> FeatureStats:
        missing = [key for key in cls.KEYS if key not in arrays]
        if missing:
            raise BloodcellError(f"feature statistics lack {', '.join(missing)}")
        return cls(*(arrays[key] for key in cls.KEYS), k=k, explained=explained)


def ood_scores(method: str, *, probs: np.ndarray, logits: np.ndarray, features: np.ndarray | None = None,
               stats: FeatureStats | None = None) -> np.ndarray:
    """The ``method``'s score for each image (higher = more out-of-distribution)."""
    if method == "msp":
        return msp_score(probs)
    if method == "energy":
        return energy_score(logits)
    if method in FEATURE_METHODS:
        if features is None or stats is None:
            raise BloodcellError(f"the '{method}' OOD score needs penultimate features and fitted statistics")
        return stats.score(method, features)
    raise BloodcellError(f"unknown OOD method '{method}' ({', '.join(OOD_METHODS)})")


def threshold_at_rate(id_scores: np.ndarray, rate: float = 0.01) -> float:
    """The score above which ``rate`` of the in-distribution images lie (flag: score > threshold)."""
    if not 0 < rate < 1:
        raise BloodcellError(f"the OOD flag rate must be between 0 and 1, got {rate}")
    return float(np.quantile(np.asarray(id_scores, dtype=np.float64), 1 - rate, method="higher"))


def separation(id_scores: np.ndarray, ood_scores_: np.ndarray) -> dict:
    """AUROC (OOD as the positive class) and the FPR at 95% TPR: the share of OOD images scoring below the
    threshold that accepts 95% of the in-distribution images."""
    id_s, ood_s = np.asarray(id_scores, np.float64), np.asarray(ood_scores_, np.float64)
    y = np.r_[np.zeros(len(id_s)), np.ones(len(ood_s))]
    t95 = np.quantile(id_s, 0.95)
    return {"auroc": float(roc_auc_score(y, np.r_[id_s, ood_s])), "fpr_at_95_tpr": float((ood_s <= t95).mean()),
            "n_id": int(len(id_s)), "n_ood": int(len(ood_s))}
