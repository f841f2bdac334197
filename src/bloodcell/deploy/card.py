"""MODEL_CARD.md of a bundle: what the model is for, what it was trained and tested on, what it gets wrong.

Every number in it comes from bundle.json (measured at export) or the run's own files; nothing is typed in.
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np

from bloodcell.io import markdown_table

PBC_CREDIT = ("PBC dataset: Acevedo A., Merino A., Alférez S., Molina Á., Boldú L., Rodellar J., \"A dataset of "
              "microscopic peripheral blood cell images for development of automatic recognition systems\", *Data in "
              "Brief* 30 (2020) 105474, doi:10.1016/j.dib.2020.105474. Licence CC BY 4.0.")
MEDMNIST_CREDIT = ("MedMNIST v2 / BloodMNIST (the crop-resize recipe and the split sizes): Yang J. et al., \"MedMNIST "
                   "v2 — A large-scale lightweight benchmark for 2D and 3D biomedical image classification\", "
                   "*Scientific Data* 10, 41 (2023).")


def confused_pairs(confusion: list[list[int]], class_names: list[str], top: int = 5) -> list[dict]:
    """The most frequent (true, predicted) errors of a confusion matrix."""
    cm = np.asarray(confusion)
    rows = [{"true": class_names[t], "predicted": class_names[p], "count": int(cm[t, p]),
             "share_of_true": round(float(cm[t, p] / max(1, cm[t].sum())), 4)}
            for t in range(len(cm)) for p in range(len(cm)) if t != p and cm[t, p]]
    return sorted(rows, key=lambda r: (-r["count"], r["true"], r["predicted"]))[:top]


def _pairs_from_run(run_dir: Path | None, top: int = 5) -> tuple[list[dict], str] | None:
    """RUN/errors_test/confused_pairs.csv (written by ``bloodcell errors``), when present."""
    path = run_dir / "errors_test" / "confused_pairs.csv" if run_dir else None
    if not path or not path.is_file():
        return None
    try:
        with open(path, encoding="utf-8") as f:
            rows = [{"true": r["true"], "predicted": r["predicted"], "count": int(r["count"]),
                     "share_of_true": float(r["share_of_true"])} for r in csv.DictReader(f)]
    except (OSError, KeyError, ValueError):
        return None
    return rows[:top], f"`{path}` (from `bloodcell errors`)"


def _is_pbc(data) -> bool:
    if data is None:
        return False
    src = str((data.meta.get("source") or {}).get("path", "")).lower()
    return data.meta.get("name") in ("pbc", "bloodmnist") or "pbc" in src or "bloodmnist" in src


def model_card(b: dict, run_dir: Path | None, data) -> str:
    """The card's markdown from bundle.json's content ``b``, the run folder and the dataset (None if missing)."""
    m, model, classes = b.get("test_metrics"), b["model"], b["class_names"]
    size, recipe = b["input_size"], b["recipe"]
    lines = [f"# Model card: {model['name']} ({size}x{size}, {len(classes)} classes)", "",
             f"Written by `bloodcell export` (bloodcell {b['bloodcell_version']}, {b['created_utc']}). "
             "Every figure below was measured at export from the files in this bundle.", "",
             "## Intended use", "",
             "Classifying single white blood cells, erythroblasts and platelets in microscope images of stained "
             "peripheral blood smears (one cell centred in the image, as in the PBC dataset) into: "
             + ", ".join(classes) + ". It is meant for research and for laboratory engineers evaluating automated "
             "pre-classification with a person reviewing every result. It is not a medical device and must not be "
             "used for diagnosis on its own.", "",
             "Inputs are preprocessed exactly as in training: a centred "
             f"{recipe['crop']}x{recipe['crop']} crop (or the shorter side), an antialiased bicubic resize to "
             f"{size}x{size}, pixels / 255" + (", standardised per channel" if b.get("normalization") else "")
             + ". Run it with `bloodcell predict BUNDLE IMAGES...` or `bloodcell.runtime.load(BUNDLE)` "
             "(numpy, Pillow and onnxruntime only).", "",
             "## Model", "",
             f"- architecture: `{model['name']}`, {model['params_keras']:,} parameters (Keras count; "
             f"{model['params_trainable']:,} trainable)",
             *[f"- `{e['file']}` ({k}): {e['bytes'] / 1e6:.2f} MB, SHA-256 `{e['sha256'][:16]}...`"
               for k, e in b["models"].items()],
             f"- temperature: {b['temperature'] if b.get('temperature') is not None else 'none (uncalibrated)'}",
             "- abstention and out-of-distribution thresholds: none yet (every image gets one of the classes)", ""]
    lines += ["## Data", ""]
    if data is not None:
        counts = data.meta.get("counts") or {}
        n = {s: int(sum(c)) for s, c in counts.items()}
        src = data.meta.get("source") or {}
        lines.append(f"Dataset `{data.meta.get('name')}` ({src.get('kind', '?')} source"
                     + (f", {src['files']:,} files" if src.get("files") else "") + "): "
                     + ", ".join(f"{s} {k:,}" for s, k in n.items()) + " images.")
        if _is_pbc(data):
            lines += ["", f"- {PBC_CREDIT}", f"- {MEDMNIST_CREDIT}"]
        else:
            lines += ["", f"- The crop-resize recipe follows {MEDMNIST_CREDIT}"]
    else:
        lines.append("The run's dataset was not available at export: no test metrics.")
    lines += ["", "## Metrics", ""]
    if m:
        lines += [f"Test split of `{m['dataset']}`, {m['n']:,} images, ONNX Runtime fp32: accuracy "
                  f"{m['accuracy']:.4f}, weighted F1 {m['f1_weighted']:.4f}, macro F1 {m['f1_macro']:.4f}"
                  + (f", macro ROC AUC {m['auc_ovr_macro']:.4f}" if m.get("auc_ovr_macro") is not None else "")
                  + ".", ""]
        rows = [[c, f"{r['precision']:.4f}", f"{r['recall']:.4f}", f"{r['f1-score']:.4f}", int(r["support"])]
                for c, r in ((c, m["per_class"][c]) for c in classes)]
        lines += [markdown_table(["class", "precision", "recall", "F1", "test images"], rows), ""]
    p = b["parity"]["fp32"]
    lines.append(f"fp32 ONNX against PyTorch on {p['n']:,} {'test' if p['data'] == 'test' else 'random'} images: "
                 f"max |logit difference| {p['max_abs_logit_diff']:.2e}, top-1 agreement {p['top1_agreement']:.2%}.")
    q = b["parity"].get("int8")
    if q:
        qi = b.get("quantization") or {}
        state = "written" if q["written"] else "not written (it lost more than allowed)"
        lines.append(f"int8 (static QDQ, {qi.get('calibration')} calibration on {qi.get('calibration_images')} "
                     f"training images, fp32 kept for {', '.join(qi.get('keep_float') or []) or 'nothing'}, chosen on "
                     f"the validation split): test accuracy "
                     f"{q['accuracy']:.4f} against {q['accuracy_fp32']:.4f} in fp32, top-1 agreement "
                     f"{q['top1_agreement_with_fp32']:.2%}; {state}.")
    lines += ["", "## Known limits", ""]
    if _is_pbc(data):
        lines += ["- The split is BloodMNIST-like (stratified, with the official per-class counts), not the official "
                  "BloodMNIST membership, which is not public: figures are comparable to, not identical with, "
                  "published BloodMNIST results.",
                  "- All PBC images come from one laboratory (Acevedo et al.: Hospital Clinic of Barcelona, "
                  "CellaVision DM96 analyser, May Grünwald-Giemsa stain); other stains, microscopes or cameras may "
                  "lower accuracy. Check on your own images first."]
    lines += [f"- The model saw {size}x{size} images of a {recipe['crop']} px crop: images much smaller than "
              "the crop get a warning, and a result for an image that is not a single centred cell is meaningless "
              "(there is no out-of-distribution check yet)."]
    pairs = _pairs_from_run(run_dir)
    if pairs is None and m:
        pairs = (confused_pairs(m["confusion_matrix"], classes), "the test confusion matrix at export")
    if pairs and pairs[0]:
        rows, where = pairs
        lines.append(f"- Most-confused class pairs (test split; {where}): "
                     + "; ".join(f"{r['true']} taken for {r['predicted']} {r['count']}x "
                                 f"({100 * r['share_of_true']:.1f}% of {r['true']})" for r in rows) + ".")
    lines += ["", "## How it was made", "", "```bash", *b["commands"], "```", ""]
    return "\n".join(lines)
