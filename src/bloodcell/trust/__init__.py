"""How far a prediction can be trusted: pure maths on arrays and tensors, no model and no files of a run.

``calibration`` (temperature scaling; ECE, MCE, NLL, Brier), ``tta`` (the views of test-time augmentation),
``selective`` (risk-coverage, confidence thresholds for a target accuracy), ``conformal`` (split-conformal
prediction sets), ``ood`` (out-of-distribution scores and their feature statistics), ``corruptions`` (batched
image corruptions at five severities), ``store`` (a run's ``calibration.json``) and ``plots``. The inference
``Classifier`` applies them; ``bloodcell calibrate`` fits them on the validation split.
"""

from bloodcell.trust.calibration import calibration_metrics, fit_temperature, mean_probabilities
from bloodcell.trust.conformal import conformal_quantile, nonconformity, prediction_sets, true_class_scores
from bloodcell.trust.selective import risk_coverage, selective_at, threshold_for_accuracy
from bloodcell.trust.tta import n_views, tta_views

__all__ = ["calibration_metrics", "conformal_quantile", "fit_temperature", "mean_probabilities", "n_views",
           "nonconformity", "prediction_sets", "risk_coverage", "selective_at", "threshold_for_accuracy",
           "true_class_scores", "tta_views"]
