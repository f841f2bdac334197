"""bloodcell: efficient, explainable classifiers for microscope images of blood cells."""

__version__ = "0.1.0"
