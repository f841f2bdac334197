"""Interpretability and error analysis: Grad-CAM, prediction galleries, label review."""
