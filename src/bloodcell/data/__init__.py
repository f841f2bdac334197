"""Data: sources, the MedMNIST crop-resize recipe, in-memory datasets, augmentation."""
