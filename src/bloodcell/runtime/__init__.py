"""The torch-free runtime: ``load(BUNDLE)`` runs a folder written by ``bloodcell export`` with ONNX Runtime.

It imports only numpy, Pillow and onnxruntime (``pip install 'bloodcell[runtime]'``), gives the same classes and
``Prediction`` results as ``bloodcell.inference.Classifier`` on the run it came from, and refuses a bundle whose
files were changed after export.
"""

from bloodcell.prediction import Prediction
from bloodcell.runtime.bundle import FORMAT, MODEL_FILES, PRECISIONS, is_bundle, read_bundle
from bloodcell.runtime.predictor import BundlePredictor, load, preprocess_file

__all__ = ["FORMAT", "MODEL_FILES", "PRECISIONS", "BundlePredictor", "Prediction", "is_bundle", "load",
           "preprocess_file", "read_bundle"]
