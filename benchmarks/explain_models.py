"""Grad-CAM measured across trained models: each run's report, one comparison grid, and a summary table/figure.

Usage (from the project root, with trained runs):
    python benchmarks/explain_models.py se-cnn=runs/bench-se-cnn/seed0 \
        cnn-t2-5=runs/benchmarks/paper-table2/cnn-t2-5/seed0@last --grid se-cnn,cnn-t2-5 --limit 800

LABEL=RUN[@CHECKPOINT] (checkpoint best by default; suite runs were tested on their last epoch, so use @last).
For each run: `bloodcell explain RUN --report` (centre energy share, model-randomisation check), copied to
OUT/LABEL/. With --grid: the per-class heatmap grid of those runs side by side. Then OUT/gradcam_models.md and
OUT/gradcam_models.png summarise every LABEL/gradcam_report.json under OUT, including earlier ones.
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

import numpy as np

from bloodcell.evaluation.plots import _save, plt
from bloodcell.explain import runs
from bloodcell.io import read_json, write_text


def parse_run(item: str) -> tuple[str, Path, str]:
    label, _, rest = item.partition("=")
    path, _, ckpt = rest.partition("@")
    return label, Path(path), ckpt or "best"


def summarise(out: Path) -> str:
    reports = {p.parent.name: read_json(p) for p in sorted(out.glob("*/gradcam_report.json"))}
    if not reports:
        return ""
    labels = list(reports)
    lines = ["# Grad-CAM measured per model", "",
             "Centre share: the fraction of Grad-CAM energy inside the central disc (radius 0.35 x side); a uniform "
             "map gives the baseline. Randomisation: Spearman rank correlation between the trained model's maps "
             "and those of the same architecture with random weights (Adebayo et al. 2018); near 0 means the maps "
             "depend on what was learned. Made by `python benchmarks/explain_models.py` (see its docstring).", "",
             "| model | run | checkpoint | layer | images | accuracy on them | centre share | uniform baseline | "
             "randomisation Spearman |", "|---|---|---|---|---:|---:|---:|---:|---:|"]
    for k, r in reports.items():
        lines.append(f"| {k} | {r['run']} | {r['checkpoint']} | {r['layer']} | {r['images']} | "
                     f"{r['accuracy_on_these_images']:.4f} | {r['centre_energy_share_mean']:.3f} | "
                     f"{r['centre_share_uniform_baseline']:.3f} | {r['randomisation_spearman_mean']:+.2f} ± "
                     f"{r['randomisation_spearman_std']:.2f} |")
    classes = list(next(iter(reports.values()))["centre_energy_share_per_class"])
    lines += ["", "Centre share per class:", "", "| model | " + " | ".join(classes) + " |",
              "|---|" + "---:|" * len(classes)]
    for k, r in reports.items():
        lines.append(f"| {k} | " + " | ".join(f"{r['centre_energy_share_per_class'][c]:.3f}" for c in classes) + " |")
    write_text(out / "gradcam_models.md", "\n".join(lines) + "\n")

    fig, (a1, a2) = plt.subplots(1, 2, figsize=(12, 0.9 + 0.45 * len(labels)))
    y = np.arange(len(labels))
    a1.barh(y, [reports[k]["centre_energy_share_mean"] for k in labels], color="tab:blue")
    a1.axvline(next(iter(reports.values()))["centre_share_uniform_baseline"], color="k", ls="--",
               label="uniform map")
    a1.set_yticks(y, labels)
    a1.invert_yaxis()
    a1.set_xlim(0, 1)
    a1.set_xlabel("Grad-CAM energy share in the central disc")
    a1.legend(fontsize=8)
    a2.barh(y, [reports[k]["randomisation_spearman_mean"] for k in labels],
            xerr=[reports[k]["randomisation_spearman_std"] for k in labels], color="tab:orange")
    a2.axvline(0, color="k", lw=0.8)
    a2.set_yticks(y, labels)
    a2.invert_yaxis()
    a2.set_xlim(-1, 1)
    a2.set_xlabel("Spearman(trained maps, random-weight maps)")
    fig.suptitle("Grad-CAM energy and model-randomisation check per model (test split)")
    fig.tight_layout()
    _save(fig, out / "gradcam_models.png")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", nargs="*", help="LABEL=RUN_DIR[@best|@last]")
    ap.add_argument("--grid", help="comma-separated LABELs to show side by side in one heatmap grid")
    ap.add_argument("--limit", type=int, default=800, help="stratified test images for the report (default 800)")
    ap.add_argument("--out", default="benchmarks/results/explain", help="output folder")
    ap.add_argument("--grid-only", action="store_true", help="skip the reports (they exist), make only the grid")
    a = ap.parse_args()
    out = Path(a.out)
    parsed = {label: (path, ckpt) for label, path, ckpt in map(parse_run, a.runs)}
    missing = [x for x in (a.grid.split(",") if a.grid else []) if x not in parsed]
    if missing:
        ap.error(f"--grid names {', '.join(missing)}, which are not among the LABEL=RUN arguments "
                 "(pass them too, with --grid-only to skip their reports)")
    for label, (path, ckpt) in ({} if a.grid_only else parsed).items():
        r = runs.report(path, "test", a.limit, checkpoint=ckpt)
        print(runs.format_report(r), flush=True)
        (out / label).mkdir(parents=True, exist_ok=True)
        for name in ("gradcam_report.json", "gradcam_centre_share.png"):
            shutil.copy2(path / "explain" / name, out / label / name)
    if a.grid:
        labels = a.grid.split(",")
        png = runs.grid([parsed[x][0] for x in labels], "test", 4, out=out, checkpoint=[parsed[x][1] for x in labels],
                         names=labels)
        target = out / f"gradcam_grid_{'_vs_'.join(labels)}.png"
        png.replace(target)
        print(f"wrote {target}")
    print(summarise(out))


if __name__ == "__main__":
    main()
