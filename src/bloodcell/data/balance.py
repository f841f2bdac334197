"""Class balancing of the training split: oversampling by augmentation or SMOTE, or class weights.

Only ever applied to the training split; validation and test stay as they are.

* ``augment``: each minority class is filled up to the target count with transformed copies of images drawn
  uniformly, with replacement, from *all* of that class's images (the paper's code augmented only the first
  image of each class; we do not copy that). Transforms (torchvision v2): flips, rotation up to 15 degrees,
  shifts up to 10 percent and zoom 0.9-1.1, like the paper's Keras generator; uncovered corners are filled
  with the image's own background colour (the median of its border), not black.
* ``smote``: imbalanced-learn's SMOTE on flattened images, ``random_state`` 42 + the run's seed (42 for seed 0,
  as in the paper).
* ``class-weight``: no new images; the loss weighs each class by n_samples / (n_classes * n_class)
  (scikit-learn's "balanced" weights).
"""

from __future__ import annotations

import numpy as np
import torch

from bloodcell.choices import BALANCES
from bloodcell.errors import BloodcellError

METHODS = BALANCES  # the one list, in bloodcell.choices


def target_counts(labels: np.ndarray, num_classes: int, target: int | None = None) -> dict[int, int]:
    """Per class, how many images it should have: ``target`` or the majority class's count (never fewer)."""
    if target is not None and (isinstance(target, bool) or not isinstance(target, (int, np.integer)) or target < 1):
        raise BloodcellError(f"balancing target must be a whole number of images >= 1, got {target!r}")
    counts = np.bincount(labels, minlength=num_classes)
    if len(labels) == 0:
        raise BloodcellError("cannot balance an empty training split")
    goal = int(target or counts.max())
    return {c: max(goal, int(counts[c])) for c in range(num_classes)}


def oversample_augment(images: np.ndarray, labels: np.ndarray, num_classes: int, target: int | None = None,
                       seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Images and labels with augmented copies appended, and the source index of every added image."""
    from torchvision.transforms import v2

    rng = np.random.default_rng(seed)
    goal = target_counts(labels, num_classes, target)
    sources = np.concatenate([
        rng.choice(np.flatnonzero(labels == c), size=goal[c] - int((labels == c).sum()), replace=True)
        for c in range(num_classes) if (labels == c).any()
    ] or [np.zeros(0, dtype=np.int64)]).astype(np.int64)
    flips = v2.Compose([v2.RandomHorizontalFlip(), v2.RandomVerticalFlip()])
    new = np.empty((len(sources), *images.shape[1:]), dtype=np.uint8)
    with torch.random.fork_rng():  # torchvision draws from the global RNG; keep the caller's stream untouched
        torch.manual_seed(seed)
        for k, i in enumerate(sources):
            img = torch.from_numpy(images[i]).permute(2, 0, 1)
            border = torch.cat([img[:, 0], img[:, -1], img[:, :, 0], img[:, :, -1]], dim=1)
            fill = border.float().median(dim=1).values.round().tolist()
            affine = v2.RandomAffine(degrees=15, translate=(0.1, 0.1), scale=(0.9, 1.1), fill=fill)
            new[k] = affine(flips(img)).permute(1, 2, 0).numpy()
    return np.concatenate([images, new]), np.concatenate([labels, labels[sources]]), sources


def oversample_smote(images: np.ndarray, labels: np.ndarray, num_classes: int, target: int | None = None,
                     seed: int = 42) -> tuple[np.ndarray, np.ndarray]:
    """SMOTE on flattened uint8 images; synthetic pixels are rounded back to uint8."""
    from imblearn.over_sampling import SMOTE

    goal = target_counts(labels, num_classes, target)
    present = {c: n for c, n in goal.items() if (labels == c).any()}
    smallest = min(int((labels == c).sum()) for c in present)
    if smallest < 2:
        raise BloodcellError("SMOTE needs at least 2 training images in every class")
    smote = SMOTE(sampling_strategy=present, random_state=seed, k_neighbors=min(5, smallest - 1))
    flat, y = smote.fit_resample(images.reshape(len(images), -1).astype(np.float32), labels)
    out = np.clip(np.rint(flat), 0, 255).astype(np.uint8).reshape(-1, *images.shape[1:])
    return out, y.astype(labels.dtype)


def class_weights(labels: np.ndarray, num_classes: int) -> torch.Tensor:
    """scikit-learn's 'balanced' weights, n / (k * n_c); classes absent from ``labels`` get weight 0."""
    from sklearn.utils.class_weight import compute_class_weight

    present = np.unique(labels)
    w = np.zeros(num_classes, dtype=np.float32)
    w[present] = compute_class_weight("balanced", classes=present, y=labels)
    return torch.from_numpy(w)


def balance_training_set(images: np.ndarray, labels: np.ndarray, num_classes: int, method: str,
                         seed: int = 0, target: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The training split after ``method`` (``none`` and ``class-weight`` return it unchanged)."""
    if method not in METHODS:
        raise BloodcellError(f"unknown balancing '{method}' (known: {', '.join(METHODS)})")
    if method == "augment":
        images, labels, _ = oversample_augment(images, labels, num_classes, target, seed)
    elif method == "smote":
        images, labels = oversample_smote(images, labels, num_classes, target, seed=42 + seed)
    return images, labels
