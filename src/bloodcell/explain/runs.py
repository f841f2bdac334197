"""Grad-CAM for a run folder: files, a per-class grid across runs, and the measured report."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from bloodcell.data.images import ImageDecodeError, list_image_files
from bloodcell.errors import BloodcellError
from bloodcell.explain.common import limit_indices, load_run_split, pick_per_class
from bloodcell.explain.figures import heatmap_grid_png, overlay_png, per_class_bar_png
from bloodcell.explain.gradcam import GradCam, measure
from bloodcell.inference import Classifier
from bloodcell.inference.ensemble import is_ensemble, member_runs, read_ensemble
from bloodcell.io import write_json
from bloodcell.runfolder import run_label


def explain_files(run_dir: str | Path, paths: list[str], layer: str | None = None, target: str | None = None,
                  out: str | Path | None = None, checkpoint: str = "best", device: str = "auto") -> list[dict]:
    """One overlay PNG per image file, for the predicted class or ``target``; for an ensemble, of each member
    (its own predicted class), in ``out/MEMBER`` (each result names its ``member``)."""
    out = Path(out) if out else _default_out(run_dir)
    if is_ensemble(run_dir):
        spec = read_ensemble(run_dir)
        results, names = [], {}
        for member in spec["member_runs"]:
            name = names[member] = _unique_name(member.name, set(names.values()))
            for r in explain_files(member, paths, layer, target, out / name, spec["checkpoint"], device):
                results.append({**r, "member": name})
        return results
    gc = GradCam(Classifier.from_run(run_dir, checkpoint, device=device), layer)
    results = []
    for f in list_image_files(paths):
        try:
            img, warnings = gc.classifier.preprocess(f)
        except ImageDecodeError as e:
            results.append({"path": str(f), "error": str(e)})
            continue
        arr = np.array(img)[None]
        t = None if target is None else gc.class_index(target)
        maps, probs = gc.maps(arr, t)
        cls = int(probs[0].argmax()) if t is None else t
        name = gc.classifier.class_names[cls]
        png = overlay_png(arr[0], maps[0], out / f"{f.stem}_gradcam_{name}.png",
                          f"{f.name}: Grad-CAM for '{name}' (p={probs[0, cls]:.3f}), layer {gc.layer_name}")
        results.append({"path": str(f), "class": name, "probability": float(probs[0, cls]), "png": str(png),
                        "warnings": warnings})
    if not results:
        raise BloodcellError("no image files found in the given paths")
    return results


def grid(run_dirs: list[str | Path], split: str = "test", per_class: int = 4, layer: str | None = None,
         out: str | Path | None = None, checkpoint: str | list[str] = "best", seed: int = 0,
         names: list[str] | None = None, device: str = "auto") -> Path:
    """Test images per class with each run's heatmap side by side (the first run's dataset).

    ``checkpoint`` is one for all runs or one per run (suite runs are tested on their last epoch); ``names`` name
    the columns (default: the run folder, or ENTRY for ENTRY/seedN folders)."""
    ckpts = [checkpoint] * len(run_dirs) if isinstance(checkpoint, str) else list(checkpoint)
    if len(ckpts) != len(run_dirs):
        raise BloodcellError("give one checkpoint, or one per run")
    if any(is_ensemble(r) for r in run_dirs):  # an ensemble's members side by side, at its checkpoint
        out = Path(out) if out else _default_out(run_dirs[0])
        expanded = [(m, read_ensemble(r)["checkpoint"], m.name) if is_ensemble(r) else (Path(r), c, run_label(Path(r)))
                    for r, c in zip(run_dirs, ckpts) for m in (member_runs(r) if is_ensemble(r) else [r])]
        return grid([r for r, _, _ in expanded], split, per_class, layer, out, [c for _, c, _ in expanded], seed,
                    names or [n for _, _, n in expanded], device)
    cams = [GradCam(Classifier.from_run(r, c, device=device), layer if k == 0 else None)
            for k, (r, c) in enumerate(zip(run_dirs, ckpts))]
    d = load_run_split(run_dirs[0], split, cams[0].classifier.class_names)
    idx = pick_per_class(d.labels, per_class, seed)
    images, labels = d.images[idx], d.labels[idx]
    maps, captions = {}, {}
    for k, (r, gc) in enumerate(zip(run_dirs, cams)):
        if gc.classifier.class_names != d.class_names or gc.size != images.shape[1]:
            raise BloodcellError(f"{r}: its classes or input size differ from {run_dirs[0]}'s; cannot compare")
        m, probs = gc.maps(images)
        key = _unique_name(names[k] if names else run_label(Path(r)), maps)
        maps[key] = m
        captions[key] = [f"{d.class_names[p]} {probs[i, p]:.2f}" for i, p in enumerate(probs.argmax(1))]
    out = Path(out) if out else _default_out(run_dirs[0])
    return heatmap_grid_png(images, labels, d.class_names, maps, captions, out / f"gradcam_grid_{split}.png",
                            f"Grad-CAM (predicted class) on {d.dataset} {split}")


def refuse_ensemble(run_dir: str | Path, what: str) -> None:
    """What measures one model (the report, the layer list) names the member runs to use instead."""
    if is_ensemble(run_dir):
        names = ", ".join(map(str, member_runs(run_dir)))
        raise BloodcellError(f"{run_dir}: is an ensemble; explain {what} looks at one model: explain a member run "
                             f"({names})")


def _default_out(run_or_file: str | Path) -> Path:
    """RUN/explain, or beside a bare weights file."""
    p = Path(run_or_file)
    return (p if p.is_dir() else p.parent) / "explain"


def _unique_name(name: str, taken: dict | set) -> str:
    k, out = 2, name
    while out in taken:
        out, k = f"{name}_{k}", k + 1
    return out


def report(run_dir: str | Path, split: str = "test", limit: int | None = None, layer: str | None = None,
           randomisation_images: int = 64, checkpoint: str = "best", seed: int = 0, device: str = "auto") -> dict:
    """Centre energy share and model-randomisation check over the split; JSON + bar chart in RUN/explain."""
    refuse_ensemble(run_dir, "--report")
    gc = GradCam(Classifier.from_run(run_dir, checkpoint, device=device), layer)
    d = load_run_split(run_dir, split, gc.classifier.class_names)
    idx = limit_indices(len(d.labels), limit, d.labels, seed)
    r = measure(gc, d.images[idx], d.labels[idx], d.class_names, randomisation_images, seed)
    r.update({"run": str(run_dir), "split": split, "checkpoint": checkpoint, "dataset": d.dataset})
    out = Path(run_dir) / "explain"
    write_json(out / "gradcam_report.json", r)
    per_class_bar_png(r["centre_energy_share_per_class"], r["centre_share_uniform_baseline"],
                      out / "gradcam_centre_share.png",
                      f"Grad-CAM energy in the central disc ({split}, layer {r['layer']})", "centre share")
    return r


def format_report(r: dict) -> str:
    lines = [f"Grad-CAM report for {r['run']} on {r['dataset']} {r['split']} ({r['images']} images, "
             f"layer {r['layer']})",
             f"centre energy share   {r['centre_energy_share_mean']}  "
             f"(uniform map: {r['centre_share_uniform_baseline']}; {r['centre_region']})",
             f"randomisation check   Spearman {r['randomisation_spearman_mean']} +- {r['randomisation_spearman_std']} "
             f"over {r['randomisation_images']} images (near 0 = maps depend on the trained weights)"]
    lines += [f"  {c:<14}{v}" for c, v in r["centre_energy_share_per_class"].items()]
    return "\n".join(lines)
