"""Classification metrics from one prediction pass (scikit-learn), and the trust metrics (bloodcell.trust)."""

from __future__ import annotations

import numpy as np
from sklearn.metrics import (
    accuracy_score,
    classification_report,
    confusion_matrix,
    precision_recall_fscore_support,
    roc_auc_score,
)

from bloodcell.trust.calibration import ECE_BINS, calibration_metrics, mean_probabilities
from bloodcell.trust.conformal import coverage_and_size, prediction_sets
from bloodcell.trust.selective import risk_coverage, selective_at
from bloodcell.trust.store import ALPHAS, TARGETS


def classification_metrics(y_true: np.ndarray, probs: np.ndarray, class_names: list[str]) -> dict:
    """Accuracy, weighted and macro P/R/F1, one-vs-rest ROC AUC (the MedMNIST metric), per-class report
    and confusion matrix, all from the same probabilities."""
    y_true = np.asarray(y_true)
    y_pred = probs.argmax(1)
    labels = list(range(len(class_names)))
    out: dict = {"n": int(len(y_true)), "accuracy": float(accuracy_score(y_true, y_pred))}
    for avg in ("weighted", "macro"):
        p, r, f, _ = precision_recall_fscore_support(y_true, y_pred, labels=labels, average=avg, zero_division=0)
        out[f"precision_{avg}"], out[f"recall_{avg}"], out[f"f1_{avg}"] = float(p), float(r), float(f)
    present = np.unique(y_true)
    if len(present) == len(labels):
        out["auc_ovr_macro"] = float(roc_auc_score(y_true, probs, multi_class="ovr", average="macro", labels=labels))
    else:  # undefined when a class is absent from this split: null in JSON, with the reason
        out["auc_ovr_macro"] = None
        missing = [class_names[i] for i in labels if i not in set(present.tolist())]
        out["auc_note"] = f"undefined: no images of {', '.join(missing)} in this split"
    out["per_class"] = classification_report(
        y_true, y_pred, labels=labels, target_names=class_names, output_dict=True, zero_division=0
    )
    out["confusion_matrix"] = confusion_matrix(y_true, y_pred, labels=labels).tolist()
    return out


def trust_metrics(y_true: np.ndarray, assessed: dict, mode=None, temperature: float = 1.0,
                  target_accuracy: float | None = None) -> dict:
    """Calibration before/after temperature scaling, risk-coverage, abstention at the validation thresholds,
    conformal coverage and set size, and the OOD flag rate, from one ``Classifier.assess`` pass.

    ``mode`` is the run's ``ModeCalibration`` for the TTA setting (None: uncalibrated, then only the
    uncalibrated figures and the risk-coverage curve)."""
    y = np.asarray(y_true).reshape(-1)
    probs = assessed["probs"]
    conf, correct = probs.max(1), probs.argmax(1) == y
    rc = risk_coverage(conf, correct)
    out: dict = {
        "tta": assessed["tta"],
        "calibration": {"temperature": temperature, "bins": ECE_BINS,
                        "before": calibration_metrics(mean_probabilities(assessed["view_logits"], 1.0), y),
                        "after": calibration_metrics(probs, y) if mode is not None else None},
        "risk_coverage": {"aurc": rc["aurc"], "coverage_at_zero_risk": float(rc["coverage"][rc["risk"] == 0].max(
            initial=0.0))},
    }
    if mode is None:
        out["calibration"]["note"] = "not calibrated: run 'bloodcell calibrate RUN' for the rest of the trust report"
        return out
    out["abstention"] = {}
    for target in TARGETS:
        t = mode.threshold_for(target)
        out["abstention"][str(target)] = {"val_threshold": t, **{k: v for k, v in selective_at(conf, correct, t).items()
                                                               if k != "threshold"}}
    t = assessed["review_threshold"]
    accepted = ~assessed["review"]
    out["review"] = {"target_accuracy_on_val": target_accuracy, "threshold": None if not np.isfinite(t) else float(t),
                     "review_share": float(assessed["review"].mean()), "accepted": int(accepted.sum()),
                     "accuracy_accepted": float(correct[accepted].mean()) if accepted.any() else None,
                     "ood_flagged_share": float(assessed["ood"].mean()), "ood_method": mode.ood_method,
                     "ood_threshold": mode.ood_threshold}
    out["conformal"] = {"method": mode.conformal_method}
    for alpha in ALPHAS:
        q = mode.conformal_q(alpha)
        sets = prediction_sets(probs, q, mode.conformal_method)
        out["conformal"][str(alpha)] = {"q": q, **coverage_and_size(sets, y)}
    return out
