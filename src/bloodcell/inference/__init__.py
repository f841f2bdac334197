"""Inference: the ``Classifier`` every predicting command uses, and the weights files it loads."""

from bloodcell.inference.classifier import Classifier, Prediction
from bloodcell.inference.weights import load_model, read_weights, resolve_weights, save_weights

__all__ = ["Classifier", "Prediction", "load_model", "read_weights", "resolve_weights", "save_weights"]
