"""A run's calibration: ``calibration.json`` (readable settings and validation figures) and
``calibration.safetensors`` (the arrays: validation scores for any conformal alpha or target accuracy, and the
feature statistics of the OOD score), fitted by ``bloodcell calibrate`` for one weights file.

Both name the SHA-256 of the weights they were fitted for, and the JSON names the arrays' SHA-256, so weights
retrained after calibrating, or a half-replaced pair of files, are noticed and the stale calibration ignored.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from safetensors import SafetensorError
from safetensors.numpy import load_file, save_file

from bloodcell.choices import CONFORMAL_METHODS, OOD_METHODS, TTA
from bloodcell.errors import BloodcellError
from bloodcell.io import atomic_write, file_sha256, read_json, warn, write_json
from bloodcell.trust.conformal import conformal_quantile
from bloodcell.trust.ood import FeatureStats
from bloodcell.trust.selective import threshold_for_accuracy

FORMAT = "bloodcell-calibration-1"
JSON_NAME = "calibration.json"
ARRAYS_NAME = "calibration.safetensors"
TARGETS = (0.99, 0.995, 0.999)  # target accuracies reported by calibrate and evaluate
ALPHAS = (0.1, 0.05, 0.01)  # conformal miscoverage levels reported


@dataclass
class ModeCalibration:
    """Everything fitted on the validation split for one test-time augmentation setting."""

    tta: str
    temperature: float
    review_threshold: float | None  # for the calibration's target accuracy; None = unreachable, review all
    ood_method: str
    ood_threshold: float
    conformal_method: str
    conformal_scores: np.ndarray  # true-class nonconformity scores of the validation images
    val_confidence: np.ndarray  # calibrated top-1 confidence of the validation images
    val_correct: np.ndarray  # whether each was right
    summary: dict = field(default_factory=dict)  # validation figures for the report

    def threshold_for(self, target: float) -> float | None:
        return threshold_for_accuracy(self.val_confidence, self.val_correct, target)

    def conformal_q(self, alpha: float) -> float:
        return conformal_quantile(self.conformal_scores, alpha)


@dataclass
class Calibration:
    checkpoint: str
    weights_sha256: str
    target_accuracy: float
    ood_rate: float
    modes: dict[str, ModeCalibration]
    features: FeatureStats | None = None
    info: dict = field(default_factory=dict)  # how it was fitted (dataset, split sizes, notes)

    def to_json(self, arrays_sha256: str) -> dict:
        modes = {t: {"temperature": m.temperature, "review_threshold": m.review_threshold,
                     "ood_method": m.ood_method, "ood_threshold": m.ood_threshold,
                     "conformal_method": m.conformal_method, **m.summary} for t, m in self.modes.items()}
        feats = None if self.features is None else {"pca_dim": int(self.features.components.shape[0]),
                                                    "feature_dim": int(self.features.mean.shape[0]),
                                                    "explained_variance": self.features.explained,
                                                    "knn_k": self.features.k, "bank": int(len(self.features.bank))}
        return {"format": FORMAT, "checkpoint": self.checkpoint, "weights_sha256": self.weights_sha256,
                "arrays_sha256": arrays_sha256, "target_accuracy": self.target_accuracy, "ood_rate": self.ood_rate,
                "features": feats, **self.info, "modes": modes}

    def save(self, folder: str | Path) -> Path:
        """Write the arrays, then the JSON naming them (atomically each)."""
        folder = Path(folder)
        arrays: dict[str, np.ndarray] = {}
        for t, m in self.modes.items():
            arrays[f"{t}/conformal_scores"] = np.asarray(m.conformal_scores, np.float64)
            arrays[f"{t}/val_confidence"] = np.asarray(m.val_confidence, np.float64)
            arrays[f"{t}/val_correct"] = np.asarray(m.val_correct, np.uint8)
        if self.features is not None:
            arrays.update({f"features/{k}": np.ascontiguousarray(v) for k, v in self.features.arrays().items()})
        atomic_write(folder / ARRAYS_NAME, lambda tmp: save_file(arrays, tmp, metadata={"format": FORMAT}))
        write_json(folder / JSON_NAME, self.to_json(file_sha256(folder / ARRAYS_NAME)))
        return folder / JSON_NAME


def load_calibration(folder: str | Path, weights: str | Path) -> Calibration | None:
    """The calibration in ``folder`` fitted for ``weights``; None when there is none, or (with a warning) when it
    was fitted for other weights or its arrays file does not match."""
    folder = Path(folder)
    path = folder / JSON_NAME
    if not path.is_file():
        return None
    d = read_json(path)
    if not isinstance(d, dict) or d.get("format") != FORMAT:
        raise BloodcellError(f"{path}: not a bloodcell calibration file; remove it or run 'bloodcell calibrate' again")
    if d.get("weights_sha256") != file_sha256(weights):
        warn(f"{path} was fitted for other weights than {weights} (retrained, or another checkpoint than its "
             f"'{d.get('checkpoint')}'); it is ignored: run 'bloodcell calibrate' again")
        return None
    arrays_path = folder / ARRAYS_NAME
    if not arrays_path.is_file() or file_sha256(arrays_path) != d.get("arrays_sha256"):
        warn(f"{arrays_path} is missing or does not match {path} (interrupted calibrate?); the calibration is "
             "ignored: run 'bloodcell calibrate' again")
        return None
    try:
        arrays = load_file(str(arrays_path))
        modes = {}
        for t, m in d["modes"].items():
            if t not in TTA or m["ood_method"] not in OOD_METHODS or m["conformal_method"] not in CONFORMAL_METHODS:
                raise KeyError(t)
            extra = {k: v for k, v in m.items() if k not in ("temperature", "review_threshold", "ood_method",
                                                             "ood_threshold", "conformal_method")}
            modes[t] = ModeCalibration(t, float(m["temperature"]), m["review_threshold"], m["ood_method"],
                                       float(m["ood_threshold"]), m["conformal_method"],
                                       arrays[f"{t}/conformal_scores"], arrays[f"{t}/val_confidence"],
                                       arrays[f"{t}/val_correct"].astype(bool), extra)
        feats = None
        if d.get("features"):
            fd = d["features"]
            feats = FeatureStats.from_arrays({k.split("/", 1)[1]: v for k, v in arrays.items()
                                              if k.startswith("features/")},
                                             k=fd["knn_k"], explained=fd.get("explained_variance"))
    except (KeyError, TypeError, ValueError, SafetensorError) as e:
        raise BloodcellError(f"{path}: incomplete or damaged calibration ({type(e).__name__}: {e}); run "
                             "'bloodcell calibrate' again") from None
    info = {k: v for k, v in d.items() if k not in ("format", "checkpoint", "weights_sha256", "arrays_sha256",
                                                    "target_accuracy", "ood_rate", "features", "modes")}
    return Calibration(d["checkpoint"], d["weights_sha256"], float(d["target_accuracy"]), float(d["ood_rate"]),
                       modes, feats, info)
