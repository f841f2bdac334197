"""Classification metrics from one prediction pass, all computed by scikit-learn."""

from __future__ import annotations

import numpy as np
from sklearn.metrics import (
    accuracy_score,
    classification_report,
    confusion_matrix,
    precision_recall_fscore_support,
    roc_auc_score,
)


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
