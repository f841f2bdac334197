"""Figures of the trust report: reliability diagram, risk-coverage curve, accuracy under corruptions."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from bloodcell.plotting import plt, save_figure


def reliability_png(before: dict, after: dict | None, path: str | Path, title: str = "") -> Path:
    """Accuracy per confidence bin against the diagonal, before and (if calibrated) after temperature scaling."""
    panels = [("uncalibrated", before)] + ([("temperature-scaled", after)] if after else [])
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 4.2), squeeze=False)
    for ax, (name, m) in zip(axes[0], panels):
        b = m["bins"]
        n = len(b["count"])
        centres = (np.arange(n) + 0.5) / n
        acc = np.array([np.nan if a is None else a for a in b["accuracy"]], dtype=float)
        ax.bar(centres, np.nan_to_num(acc), width=1 / n, edgecolor="black", color="tab:blue", label="accuracy")
        conf = np.array([np.nan if c is None else c for c in b["confidence"]], dtype=float)
        ax.bar(centres, np.nan_to_num(conf - acc), bottom=np.nan_to_num(acc), width=1 / n, color="tab:red",
               alpha=0.35, label="gap to confidence")
        ax.plot([0, 1], [0, 1], "k--", lw=1)
        ax.set(xlim=(0, 1), ylim=(0, 1), xlabel="confidence", ylabel="accuracy",
               title=f"{name}: ECE {m['ece']:.4f}, MCE {m['mce']:.3f}")
        ax.legend(loc="upper left", fontsize=8)
    if title:
        fig.suptitle(title)
    return save_figure(fig, path)


def risk_coverage_png(curve: dict, path: str | Path, title: str = "", points: dict | None = None) -> Path:
    """Error rate among the accepted predictions against the share accepted; ``points`` marks chosen thresholds."""
    fig, ax = plt.subplots(figsize=(5.5, 4.2))
    ax.plot(curve["coverage"], curve["risk"], lw=1.5, label=f"AURC {curve['aurc']:.5f}")
    for name, (cov, risk) in (points or {}).items():
        if cov is not None and risk is not None:
            ax.plot([cov], [risk], "o", label=name)
    ax.set(xlabel="coverage (share of predictions accepted)", ylabel="risk (error rate among accepted)",
           xlim=(0, 1.01), ylim=(0, None), title=title or "risk-coverage")
    ax.legend(fontsize=8)
    return save_figure(fig, path)


def corruption_png(results: dict, clean_accuracy: float, path: str | Path, title: str = "") -> Path:
    """Accuracy against severity, one line per corruption."""
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for i, (name, r) in enumerate(results.items()):
        sev = sorted(r["severities"], key=int)
        ax.plot([0, *map(int, sev)], [clean_accuracy, *(r["severities"][s]["accuracy"] for s in sev)], marker="o",
                ms=3, lw=1, ls="-" if i < 10 else "--", label=name)  # 10 colours, then dashed
    ax.set(xlabel="severity (0 = clean)", ylabel="accuracy", title=title or "accuracy under corruptions")
    ax.legend(fontsize=7, ncol=2)
    return save_figure(fig, path)
