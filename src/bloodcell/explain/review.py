"""Rank the images most likely mislabelled (confident learning, cleanlab) for a person to review.

cleanlab needs out-of-sample probabilities for every image, so train+val are split into k stratified folds
and one model per fold (the ordinary ``train()``, data built in memory) predicts the fold it did not see.
The last epoch's weights are used: the "best" checkpoint is chosen on the held-out fold and would leak.
The CSV is meant to be edited (``action``: keep / relabel / drop, ``new_label``) and then applied with
``bloodcell.data.corrections.apply_corrections``.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np

from bloodcell.data.store import PreparedData, load_dataset
from bloodcell.errors import BloodcellError
from bloodcell.explain.common import split_paths
from bloodcell.explain.figures import gallery_png
from bloodcell.inference import Classifier
from bloodcell.io import csv_text, write_text
from bloodcell.training.config import TrainConfig
from bloodcell.training.loop import train

REVIEW_FIELDS = ["rank", "path", "split", "index", "given_label", "suggested_label", "score", "flagged",
                 "action", "new_label"]
REVIEW_SPLITS = ("train", "val")


def pooled(data: PreparedData) -> tuple[np.ndarray, np.ndarray, list[str], list[int], list[str | None]]:
    """Train and val together: images, labels, and each image's split, index within it and path."""
    images = np.concatenate([data.images[s] for s in REVIEW_SPLITS])
    labels = np.concatenate([data.labels[s] for s in REVIEW_SPLITS])
    splits, index, paths = [], [], []
    for s in REVIEW_SPLITS:
        n = len(data.labels[s])
        sp = split_paths(data, s)
        splits += [s] * n
        index += list(range(n))
        paths += sp if sp else [None] * n
    return images, labels, splits, index, paths


def fold_data(data: PreparedData, images: np.ndarray, labels: np.ndarray, train_idx: np.ndarray,
              held_idx: np.ndarray) -> PreparedData:
    """An in-memory dataset: the fold's training part as train, the held-out part as val and test."""
    held_x, held_y = images[held_idx], labels[held_idx]
    return PreparedData({"train": images[train_idx], "val": held_x, "test": held_x},
                        {"train": labels[train_idx], "val": held_y, "test": held_y},
                        data.class_names, {k: v for k, v in data.meta.items() if k != "paths"}, data.path)


def out_of_sample_probs(data: PreparedData, cfg: TrainConfig, folds: int, seed: int = 0,
                        log=print) -> np.ndarray:
    """Probabilities for every train+val image from the fold model that did not train on it."""
    from sklearn.model_selection import StratifiedKFold

    images, labels = pooled(data)[:2]
    smallest = int(np.bincount(labels, minlength=data.num_classes).min())
    if folds < 2 or smallest < folds:
        raise BloodcellError(f"dataset '{data.meta.get('name')}': {folds} folds need at least that many images "
                             f"of every class in train+val (smallest class has {smallest})")
    probs = np.zeros((len(labels), data.num_classes), dtype=np.float64)
    kfold = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)
    with tempfile.TemporaryDirectory(prefix="bloodcell-review-") as tmp:
        for k, (tr, held) in enumerate(kfold.split(np.zeros(len(labels)), labels)):
            log(f"fold {k + 1}/{folds}: training on {len(tr)}, predicting {len(held)}")
            run = Path(tmp) / f"fold{k}"
            train(cfg, run, data=fold_data(data, images, labels, tr, held), log=lambda s: None, progress=False)
            clf = Classifier.from_run(run, "last", device=cfg.device)
            probs[held] = clf.predict_arrays(images[held]).astype(np.float64)
    return probs


def rank_label_issues(labels: np.ndarray, probs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """cleanlab label-quality scores (low = suspect) and the flag of cleanlab's issue filter."""
    from cleanlab.filter import find_label_issues
    from cleanlab.rank import get_label_quality_scores

    scores = get_label_quality_scores(labels, probs, method="self_confidence")
    flagged = find_label_issues(labels, probs, filter_by="prune_by_noise_rate")
    return scores, flagged


def review_rows(data: PreparedData, probs: np.ndarray, top: int) -> list[dict]:
    """Rows of the review CSV: every flagged image plus the ``top`` lowest-scored, worst first."""
    images, labels, splits, index, paths = pooled(data)
    scores, flagged = rank_label_issues(labels, probs)
    order = np.argsort(scores, kind="stable")
    keep = [i for r, i in enumerate(order) if r < top or flagged[i]]
    names = data.class_names
    return [{"rank": r + 1, "path": paths[i] or "", "split": splits[i], "index": index[i],
             "given_label": names[labels[i]], "suggested_label": names[int(probs[i].argmax())],
             "score": round(float(scores[i]), 6), "flagged": int(bool(flagged[i])), "action": "keep",
             "new_label": ""} for r, i in enumerate(keep)]


def rows_csv(rows: list[dict]) -> str:
    return csv_text(REVIEW_FIELDS, rows)


def review_dataset(data_name: str, *, size: int = 64, model: str = "se-cnn", folds: int = 5, epochs: int = 5,
                   out: str | Path | None = None, data_dir: str | None = None, top: int = 200, gallery: int = 32,
                   seed: int = 0, threads: int | None = None, model_args: dict | None = None, batch_size: int = 64,
                   lr: float = 1e-3, device: str = "auto", log=print) -> dict:
    """Cross-validated probabilities -> cleanlab ranking -> ``label_review.csv`` and ``suspects.png``.

    Each fold model trains with the recommended recipe (``TrainConfig``'s defaults) for ``epochs``."""
    data = load_dataset(data_name, size, data_dir)
    name = data.meta.get("name", data_name)
    out = Path(out) if out else Path("runs") / f"review_{name}{size}_{model}"
    cfg = TrainConfig(model=model, model_args=model_args or {}, data=data_name, size=size, data_dir=data_dir,
                      epochs=epochs, batch_size=batch_size, seed=seed, lr=lr, threads=threads,
                      device=device).validate()
    probs = out_of_sample_probs(data, cfg, folds, seed, log)
    rows = review_rows(data, probs, top)
    write_text(out / "label_review.csv", rows_csv(rows))
    pooled_images = {s: data.images[s] for s in REVIEW_SPLITS}
    items = [(pooled_images[r["split"]][r["index"]],
              f"{r['split']}#{r['index']}\n{r['given_label']}->{r['suggested_label']}\n{r['score']:.3f}")
             for r in rows[:gallery]]
    ncols = 8
    gallery_rows = [(f"{i + 1}-{i + len(items[i:i + ncols])}", items[i:i + ncols]) for i in range(0, len(items), ncols)]
    gallery_png(gallery_rows, out / "suspects.png", f"{name}: most likely mislabelled (given->suggested, score)",
                ncols)
    acc = float((probs.argmax(1) == pooled(data)[1]).mean())
    return {"images": int(len(probs)), "flagged": int(sum(r["flagged"] for r in rows)), "cv_accuracy": acc,
            "rows": rows, "csv": str(out / "label_review.csv"), "gallery": str(out / "suspects.png"), "out": str(out)}
