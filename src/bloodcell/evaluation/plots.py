"""Figures as PNG files (matplotlib, no display needed)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from bloodcell.plotting import plt, save_figure


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
    return save_figure(fig, path)


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
    return save_figure(fig, path)


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
    return save_figure(fig, path)


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
    return save_figure(fig, path)


def bar_metric_png(labels: list[str], means: list[float | None], stds: list[float], paper: list[float | None],
                   path: str | Path, title: str, metric: str) -> Path:
    """Horizontal bars of ours (mean, std error bars) with the paper's value as a marker (Fig. 7 and 10)."""
    y = np.arange(len(labels))
    fig, ax = plt.subplots(figsize=(7, 0.9 + 0.38 * len(labels)))
    ours = [np.nan if m is None else m for m in means]
    ax.barh(y, ours, xerr=stds, color="tab:blue", alpha=0.8, label="bloodcell (mean ± std over seeds)")
    px = [np.nan if p is None else p for p in paper]
    if not np.all(np.isnan(px)):
        ax.plot(px, y, "D", color="tab:red", label="paper")
    finite = [v for v in ours + px if not np.isnan(v)]
    lo = min(finite) if finite else 0.0
    ax.set_xlim(max(0.0, lo - 0.05), 1.0)
    ax.set_yticks(y, labels)
    ax.invert_yaxis()
    ax.set_xlabel(metric)
    ax.set_title(title)
    ax.grid(axis="x", alpha=0.3)
    ax.legend(loc="lower left", fontsize=8)
    return save_figure(fig, path)


def metric_vs_cost_png(labels: list[str], values: list[float | None], seconds: list[float | None],
                       size_mb: list[float | None], path: str | Path, metric: str) -> Path:
    """A metric against total training time and against model size, log x (Fig. 8 and 11)."""
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for ax, cost, xlabel in ((axes[0], seconds, "total training time (s, this CPU)"),
                             (axes[1], size_mb, "model size (MB, safetensors)")):
        for lab, v, c in zip(labels, values, cost):
            if v is None or not c:
                continue
            ax.scatter(c, v)
            ax.annotate(lab, (c, v), fontsize=7, xytext=(3, 3), textcoords="offset points")
        ax.set_xscale("log")
        ax.set_xlabel(xlabel)
        ax.set_ylabel(metric)
        ax.grid(alpha=0.3)
    return save_figure(fig, path)


def line_style(k: int) -> dict:
    """The k-th series' colour and dash: past ten series the colours repeat, so the dash tells them apart."""
    return {"color": f"C{k % 10}", "linestyle": ("-", "--", ":", "-.")[k // 10 % 4]}


def curves_png(histories: dict[str, list[dict]], path: str | Path, keys: tuple[str, ...], title: str,
               panels: bool = False, columns: int = 4) -> Path:
    """History curves: all labels on one axis per key, or (``panels``) one accuracy and one loss panel per label."""
    items = [(lab, h) for lab, h in histories.items() if h]
    if not panels:
        fig, axes = plt.subplots(1, len(keys), figsize=(7 * len(keys), 4.5), squeeze=False)
        for ax, key in zip(axes[0], keys):
            for k, (lab, h) in enumerate(items):
                ax.plot([r["epoch"] for r in h], [r[key] for r in h], marker=".", label=lab, **line_style(k))
            ax.set_xlabel("epoch")
            ax.set_ylabel(key.replace("_", " "))
            ax.grid(alpha=0.3)
            if items:  # e.g. only ensembles, which have no history of their own
                ax.legend(fontsize=7, ncol=2)
    else:
        n = max(1, len(items))
        cols = min(columns, n)
        rows = -(-n // cols)
        fig, axes = plt.subplots(2 * rows, cols, figsize=(4 * cols, 5.6 * rows), squeeze=False)
        for ax in axes.flat:
            ax.axis("off")
        for k, (lab, h) in enumerate(items):
            r, c = divmod(k, cols)
            ep = [x["epoch"] for x in h]
            for ax, kind in ((axes[2 * r][c], "acc"), (axes[2 * r + 1][c], "loss")):
                ax.axis("on")
                for key in keys:
                    if key.endswith(kind):
                        ax.plot(ep, [x[key] for x in h], marker=".", label=key.split("_")[0])
                ax.set_title(f"{lab}: {'accuracy' if kind == 'acc' else 'loss'}", fontsize=9)
                ax.set_xlabel("epoch", fontsize=8)
                ax.grid(alpha=0.3)
                ax.legend(fontsize=7)
    fig.suptitle(title)
    fig.tight_layout()
    return save_figure(fig, path)
