"""What the explain commands share: a run's dataset split, its file paths, and per-class picks."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from bloodcell.data.store import SPLITS, PreparedData, load_dataset
from bloodcell.errors import BloodcellError
from bloodcell.training.config import TrainConfig


@dataclass
class SplitData:
    images: np.ndarray
    labels: np.ndarray
    class_names: list[str]
    paths: list[str] | None  # source file of each image, when the dataset recorded them
    split: str
    dataset: str


def split_paths(data: PreparedData, split: str) -> list[str] | None:
    paths = (data.meta.get("paths") or {}).get(split)
    return list(paths) if paths is not None and len(paths) == len(data.labels[split]) else None


def load_run_split(run_dir: str | Path, split: str = "test", class_names: list[str] | None = None) -> SplitData:
    """The split of the dataset a run was trained on (as ``evaluate`` loads it)."""
    run_dir = Path(run_dir)
    if not (run_dir / "config.json").is_file():
        raise BloodcellError(f"{run_dir}: no config.json (is this a bloodcell run folder?)")
    if split not in SPLITS:
        raise BloodcellError(f"unknown split '{split}' (train, val, test)")
    cfg = TrainConfig.load(run_dir / "config.json")
    data = load_dataset(cfg.data, cfg.size, cfg.data_dir)
    if class_names is not None and data.class_names != class_names:
        raise BloodcellError(f"{run_dir}: the dataset's classes {data.class_names} differ from the model's")
    return SplitData(data.images[split], data.labels[split], data.class_names, split_paths(data, split), split,
                     data.meta.get("name", cfg.data))


def pick_per_class(labels: np.ndarray, per_class: int, seed: int = 0) -> np.ndarray:
    """Up to ``per_class`` indices of each class, seeded, sorted by class then index."""
    rng = np.random.default_rng(seed)
    out = []
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        out.append(np.sort(rng.choice(idx, size=min(per_class, len(idx)), replace=False)))
    return np.concatenate(out) if out else np.zeros(0, dtype=int)


def limit_indices(n: int, limit: int | None, labels: np.ndarray, seed: int = 0) -> np.ndarray:
    """All indices, or a stratified subset of about ``limit`` of them."""
    if not limit or limit >= n:
        return np.arange(n)
    from bloodcell.data.tensors import stratified_subset

    return stratified_subset(labels, limit, seed)
