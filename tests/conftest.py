"""Shared fixtures: small synthetic data the tests make themselves, and the real PBC data when present."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
PBC = Path(os.environ.get("BLOODCELL_PBC", REPO.parent / "shared" / "data" / "pbc"))
CLASSES = ["alpha", "beta", "gamma"]

torch.set_num_threads(int(os.environ.get("BLOODCELL_TEST_THREADS", min(2, os.cpu_count() or 1))))


def synthetic_cell(label: int, rng: np.random.Generator, size: int = 96) -> np.ndarray:
    """A light background with one coloured disc; the class sets colour and radius, so it is learnable."""
    img = np.full((size, size, 3), 235, dtype=np.uint8) + rng.integers(0, 15, (size, size, 3), dtype=np.uint8)
    yy, xx = np.mgrid[:size, :size]
    cy, cx = size / 2 + rng.normal(0, 3, 2)
    r = size * (0.15 + 0.08 * label)
    disc = (yy - cy) ** 2 + (xx - cx) ** 2 < r**2
    colour = np.array([[150, 60, 160], [200, 90, 90], [90, 90, 200]][label % 3], dtype=np.uint8)
    img[disc] = colour
    return img


@pytest.fixture(autouse=True)
def _isolated_data_dir(tmp_path, monkeypatch):
    """Every test gets its own dataset cache so nothing leaks between tests or into the user's cache."""
    monkeypatch.setenv("BLOODCELL_DATA_DIR", str(tmp_path / "datasets"))


@pytest.fixture
def image_tree(tmp_path) -> Path:
    """A folder-per-class tree of 20 JPEG/PNG images per class (96x97 px, like a small PBC)."""
    rng = np.random.default_rng(0)
    root = tmp_path / "cells"
    for c, name in enumerate(CLASSES):
        (root / name).mkdir(parents=True)
        for i in range(20):
            arr = synthetic_cell(c, rng)
            arr = np.concatenate([arr, arr[:1]], axis=0)  # 97 x 96: not square, like the PBC images
            ext = "png" if i % 4 == 0 else "jpg"
            Image.fromarray(arr).save(root / name / f"{name}_{i:03d}.{ext}")
    return root


def synthetic_arrays(n_per_class: dict[str, int], size: int = 28, k: int = 8, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    out = {}
    for split, n in n_per_class.items():
        labels = np.repeat(np.arange(k), n)
        imgs = np.stack([
            np.asarray(Image.fromarray(synthetic_cell(int(y), rng)).resize((size, size), Image.Resampling.BICUBIC))
            for y in labels
        ])
        out[f"{split}_images"] = imgs.astype(np.uint8)
        out[f"{split}_labels"] = labels.reshape(-1, 1).astype(np.uint8)
    return out


@pytest.fixture
def tiny_npz(tmp_path) -> Path:
    """A MedMNIST-format npz with 8 classes at 28x28, written by the test itself."""
    path = tmp_path / "bloodmnist.npz"
    np.savez(path, **synthetic_arrays({"train": 12, "val": 4, "test": 4}, size=28))
    return path


@pytest.fixture
def prepared(tiny_npz) -> str:
    """The tiny npz prepared as the dataset 'bloodmnist' (28 px); returns its name."""
    from bloodcell.data.sources import prepare_from_npz

    prepare_from_npz(tiny_npz)
    return "bloodmnist"


@pytest.fixture
def run(tiny_npz, tmp_path) -> Path:
    """A run folder: SE-CNN trained for 2 epochs on the tiny npz at 28x28. Without BatchNorm recalibration, so the
    model still gets some test images wrong and the reports that list errors (e.g. the model card's most-confused
    pairs) have something to show; with it, this tiny test split is classified perfectly."""
    from bloodcell.data.sources import prepare_from_npz
    from bloodcell.training import TrainConfig, train

    prepare_from_npz(tiny_npz)
    out = tmp_path / "run"
    train(TrainConfig(model="se-cnn", data="bloodmnist", size=28, epochs=2, batch_size=32, threads=1,
                      bn_recalibrate=0), out, log=lambda s: None)
    return out


def real_subset_split(pbc: Path, path: Path, per_split: dict[str, int]) -> Path:
    """A split CSV naming the first ``per_split[split]`` images of each class and split of the real split.csv."""
    import csv

    rows, taken = [], {}
    with open(pbc / "split.csv") as f:
        for r in csv.DictReader(f):
            key = (r["label"], r["split"])
            if taken.get(key, 0) < per_split[r["split"]]:
                taken[key] = taken.get(key, 0) + 1
                rows.append(r)
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["path", "label", "split"])
        w.writeheader()
        w.writerows(rows)
    return path


@pytest.fixture
def pbc() -> Path:
    if not (PBC / "split.csv").is_file():
        pytest.skip(f"real PBC data not found at {PBC}")
    return PBC
