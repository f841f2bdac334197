"""Figures of the explain commands: heatmap overlays, per-class grids and image galleries (PNG, Agg)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from bloodcell.plotting import plt, save_figure


def _norm_map(m: np.ndarray) -> np.ndarray:
    """Positive part scaled to [0, 1], as Grad-CAM is usually shown."""
    pos = np.clip(m, 0, None)
    top = pos.max()
    return pos / top if top > 0 else pos


def show_overlay(ax, image: np.ndarray, heatmap: np.ndarray, alpha: float = 0.5) -> None:
    ax.imshow(image)
    ax.imshow(_norm_map(heatmap), cmap="jet", alpha=alpha, vmin=0, vmax=1)
    ax.axis("off")


def overlay_png(image: np.ndarray, heatmap: np.ndarray, path: str | Path, title: str = "") -> Path:
    """Input, heatmap and overlay side by side for one image."""
    fig, axes = plt.subplots(1, 3, figsize=(7.5, 2.8))
    axes[0].imshow(image)
    axes[1].imshow(_norm_map(heatmap), cmap="jet", vmin=0, vmax=1)
    show_overlay(axes[2], image, heatmap)
    for ax, t in zip(axes, ("input", "Grad-CAM", "overlay")):
        ax.set_title(t, fontsize=9)
        ax.axis("off")
    if title:
        fig.suptitle(title, fontsize=9)
    return save_figure(fig, path)


def heatmap_grid_png(images: np.ndarray, labels: np.ndarray, class_names: list[str],
                     maps_by_run: dict[str, np.ndarray], captions_by_run: dict[str, list[str]],
                     path: str | Path, title: str = "") -> Path:
    """One row per class; for each image its input then one overlay per run (runs side by side)."""
    k = len(class_names)
    per_class = max((int((labels == c).sum()) for c in range(k)), default=0)
    runs = list(maps_by_run)
    cols = per_class * (1 + len(runs))
    fig, axes = plt.subplots(k, max(cols, 1), figsize=(1.25 * max(cols, 1), 1.45 * k), squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    for c in range(k):
        for j, i in enumerate(np.flatnonzero(labels == c)):
            base = j * (1 + len(runs))
            axes[c][base].imshow(images[i])
            for r, run in enumerate(runs):
                ax = axes[c][base + 1 + r]
                show_overlay(ax, images[i], maps_by_run[run][i])
                ax.set_title(f"{run}\n{captions_by_run[run][i]}", fontsize=5)
        axes[c][0].text(-0.1, 0.5, class_names[c], transform=axes[c][0].transAxes, ha="right", va="center")
    if title:
        fig.suptitle(title)
    return save_figure(fig, path)


def per_class_bar_png(values: dict[str, float | None], baseline: float, path: str | Path, title: str,
                      ylabel: str) -> Path:
    names = list(values)
    fig, ax = plt.subplots(figsize=(max(5, 0.8 * len(names)), 3.5))
    ax.bar(range(len(names)), [v if v is not None else 0 for v in values.values()])
    ax.axhline(baseline, color="grey", linestyle="--", label=f"uniform map {baseline:.3f}")
    ax.set_xticks(range(len(names)), names, rotation=30, ha="right")
    ax.set_ylim(0, 1)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend()
    return save_figure(fig, path)


def gallery_png(rows: list[tuple[str, list[tuple[np.ndarray, str]]]], path: str | Path, title: str = "",
                ncols: int | None = None) -> Path:
    """Rows of captioned images; each row is (row label, [(image, caption), ...])."""
    ncols = ncols or max((len(items) for _, items in rows), default=1)
    ncols = max(ncols, 1)
    fig, axes = plt.subplots(max(len(rows), 1), ncols, figsize=(1.5 * ncols + 1, 1.7 * max(len(rows), 1)),
                             squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    for r, (label, items) in enumerate(rows):
        for j, (img, caption) in enumerate(items[:ncols]):
            axes[r][j].imshow(img)
            axes[r][j].set_title(caption, fontsize=6)
        axes[r][0].text(-0.1, 0.5, label, transform=axes[r][0].transAxes, ha="right", va="center", fontsize=8)
    if title:
        fig.suptitle(title)
    return save_figure(fig, path)
