"""Error analysis of a run: galleries of right and wrong predictions, and the most-confused class pairs.

Everything comes from one prediction pass over the split, through the run's ``Classifier`` (as ``evaluate``).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from bloodcell.explain.common import SplitData, load_run_split
from bloodcell.explain.figures import gallery_png
from bloodcell.inference import Classifier
from bloodcell.io import csv_text, write_text


def predict_split(run_dir: str | Path, split: str = "test", checkpoint: str = "best",
                  device: str = "auto") -> tuple[SplitData, np.ndarray]:
    """The split and the run's probabilities for it (one pass)."""
    clf = Classifier.from_run(run_dir, checkpoint, device=device)
    d = load_run_split(run_dir, split, clf.class_names)
    return d, clf.predict_arrays(d.images)


def confused_pairs(labels: np.ndarray, pred: np.ndarray, class_names: list[str]) -> list[dict]:
    """Off-diagonal (true, predicted) pairs with counts, most frequent first, with their image indices."""
    rows = []
    for t in range(len(class_names)):
        for p in range(len(class_names)):
            idx = np.flatnonzero((labels == t) & (pred == p))
            if t != p and len(idx):
                rows.append({"true": class_names[t], "predicted": class_names[p], "count": int(len(idx)),
                             "share_of_true": round(len(idx) / int((labels == t).sum()), 4),
                             "indices": idx.tolist()})
    return sorted(rows, key=lambda r: (-r["count"], r["true"], r["predicted"]))


def _caption(d: SplitData, probs: np.ndarray, i: int) -> str:
    p = int(probs[i].argmax())
    name = Path(d.paths[i]).name if d.paths else f"#{i}"
    return f"{name}\n{d.class_names[d.labels[i]]}->{d.class_names[p]} {probs[i, p]:.2f}"


def _gallery_rows(d: SplitData, probs: np.ndarray, correct: bool, per_class: int) -> list:
    """Per true class, the most confident correct (or wrong) predictions."""
    pred, conf = probs.argmax(1), probs.max(1)
    rows = []
    for c, name in enumerate(d.class_names):
        idx = np.flatnonzero((d.labels == c) & ((pred == c) if correct else (pred != c)))
        idx = idx[np.argsort(-conf[idx], kind="stable")][:per_class]
        rows.append((f"{name} ({len(idx)})" if not correct else name,
                     [(d.images[i], _caption(d, probs, i)) for i in idx]))
    return rows


def pairs_csv(pairs: list[dict], d: SplitData, examples: int = 5) -> str:
    header = ["true", "predicted", "count", "share_of_true", "example_indices", "example_paths"]
    return csv_text(header, ([r["true"], r["predicted"], r["count"], r["share_of_true"],
                              " ".join(map(str, r["indices"][:examples])),
                              " ".join(d.paths[i] for i in r["indices"][:examples]) if d.paths else ""]
                             for r in pairs))


def pairs_markdown(pairs: list[dict], d: SplitData, run: str, accuracy: float, examples: int = 3) -> str:
    lines = [f"# Most-confused class pairs: {run} on {d.dataset} {d.split}", "",
             f"{len(d.labels)} images, accuracy {accuracy:.4f}, {sum(r['count'] for r in pairs)} errors.", "",
             "| true | predicted | count | share of true class | examples |", "|---|---|---|---|---|"]
    for r in pairs:
        ex = r["indices"][:examples]
        names = ", ".join(d.paths[i] for i in ex) if d.paths else ", ".join(f"#{i}" for i in ex)
        lines.append(f"| {r['true']} | {r['predicted']} | {r['count']} | {r['share_of_true']:.3f} | {names} |")
    return "\n".join(lines) + "\n"


def error_analysis(run_dir: str | Path, split: str = "test", per_class: int = 8, out: str | Path | None = None,
                   checkpoint: str = "best", top_pairs: int = 8, device: str = "auto") -> dict:
    """Write galleries and confused-pair tables for ``run_dir`` into ``out`` (default RUN/errors_SPLIT)."""
    run_dir = Path(run_dir)
    out = Path(out) if out else run_dir / f"errors_{split}"
    d, probs = predict_split(run_dir, split, checkpoint, device)
    pred = probs.argmax(1)
    acc = float((pred == d.labels).mean())
    pairs = confused_pairs(d.labels, pred, d.class_names)
    files = {
        "correct": gallery_png(_gallery_rows(d, probs, True, per_class), out / "correct.png",
                               f"{run_dir.name}: correct, most confident first", per_class),
        "incorrect": gallery_png(_gallery_rows(d, probs, False, per_class), out / "incorrect.png",
                                 f"{run_dir.name}: wrong (true->predicted), most confident first", per_class),
    }
    pair_rows = [(f"{r['true']}->{r['predicted']}\n({r['count']})",
                  [(d.images[i], _caption(d, probs, i)) for i in r["indices"][:per_class]])
                 for r in pairs[:top_pairs]]
    if pair_rows:
        files["confused_pairs_png"] = gallery_png(pair_rows, out / "confused_pairs.png",
                                                  f"{run_dir.name}: most-confused pairs", per_class)
    write_text(out / "confused_pairs.csv", pairs_csv(pairs, d))
    write_text(out / "confused_pairs.md", pairs_markdown(pairs, d, run_dir.name, acc))
    files.update({"confused_pairs_csv": out / "confused_pairs.csv", "confused_pairs_md": out / "confused_pairs.md"})
    return {"n": int(len(d.labels)), "accuracy": acc, "errors": int((pred != d.labels).sum()), "pairs": pairs,
            "files": {k: str(v) for k, v in files.items()}, "out": str(out)}
