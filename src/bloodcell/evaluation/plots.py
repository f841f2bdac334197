"""Figures as PNG files (matplotlib, no display needed)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def _save(fig, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.tmp.png")
    fig.savefig(tmp, dpi=120, bbox_inches="tight")
    plt.close(fig)
    tmp.replace(path)
    return path


def confusion_matrix_png(cm: np.ndarray, class_names: list[str], path: str | Path, title: str = "") -> Path:
    cm = np.asarray(cm)
    rates = cm / np.maximum(cm.sum(1, keepdims=True), 1)
    k = len(class_names)
    fig, ax = plt.subplots(figsize=(1 + 0.8 * k, 0.8 + 0.7 * k))
    ax.imshow(rates, cmap="Blues", vmin=0, vmax=1)
    for i in range(k):
        for j in range(k):
            ax.text(j, i, str(cm[i, j]), ha="center", va="center", fontsize=8,
                    color="white" if rates[i, j] > 0.5 else "black")
    ax.set_xticks(range(k), class_names, rotation=45, ha="right")
    ax.set_yticks(range(k), class_names)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title or "confusion matrix (counts; colour = row rate)")
    return _save(fig, path)


def class_counts_png(counts: dict[str, list[int]], class_names: list[str], path: str | Path, title: str) -> Path:
    k = len(class_names)
    fig, ax = plt.subplots(figsize=(max(6, 0.9 * k), 4))
    width = 0.8 / len(counts)
    for n, (split, c) in enumerate(counts.items()):
        ax.bar(np.arange(k) + n * width - 0.4 + width / 2, c, width, label=split)
    ax.set_xticks(range(k), class_names, rotation=30, ha="right")
    ax.set_ylabel("images")
    ax.set_title(title)
    ax.legend()
    return _save(fig, path)


def sample_grid_png(images: np.ndarray, labels: np.ndarray, class_names: list[str], path: str | Path,
                    per_class: int = 6, seed: int = 0, title: str = "") -> Path:
    rng = np.random.default_rng(seed)
    k = len(class_names)
    fig, axes = plt.subplots(k, per_class, figsize=(1.3 * per_class, 1.3 * k), squeeze=False)
    for c in range(k):
        idx = np.flatnonzero(labels == c)
        pick = rng.choice(idx, size=min(per_class, len(idx)), replace=False) if len(idx) else []
        for j in range(per_class):
            ax = axes[c][j]
            ax.axis("off")
            if j < len(pick):
                ax.imshow(images[pick[j]])
        axes[c][0].text(-0.1, 0.5, class_names[c], transform=axes[c][0].transAxes, ha="right", va="center")
    if title:
        fig.suptitle(title)
    return _save(fig, path)


def history_png(history: list[dict], path: str | Path, title: str = "") -> Path:
    ep = [h["epoch"] for h in history]
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 3.5))
    a1.plot(ep, [h["train_loss"] for h in history], label="train")
    a1.plot(ep, [h["val_loss"] for h in history], label="val")
    a1.set_xlabel("epoch")
    a1.set_ylabel("loss")
    a1.legend()
    a2.plot(ep, [h["train_acc"] for h in history], label="train")
    a2.plot(ep, [h["val_acc"] for h in history], label="val")
    a2.set_xlabel("epoch")
    a2.set_ylabel("accuracy")
    a2.legend()
    if title:
        fig.suptitle(title)
    return _save(fig, path)
