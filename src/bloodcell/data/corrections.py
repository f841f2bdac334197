"""Apply a reviewed label-correction CSV (from ``bloodcell review``) to a dataset's arrays and metadata.

A row names an image by ``path`` (when the dataset recorded source paths) or else by ``split`` + ``index``
(its position in that split before any correction). ``action`` is ``keep`` (or empty), ``relabel`` (to
``new_label``, a class name or number) or ``drop``. ``given_label``, when present, must match the current
label: a CSV made for another version of the dataset fails instead of silently changing the wrong images.
The file's SHA-256 goes into the metadata so a corrected dataset says which corrections made it.
"""

from __future__ import annotations

import csv
import hashlib
from pathlib import Path

import numpy as np

from bloodcell.data.store import SPLITS
from bloodcell.errors import BloodcellError

ACTIONS = ("keep", "relabel", "drop")


def read_corrections(path: str | Path) -> list[dict]:
    """The rows of a corrections CSV with a non-keep action, each with its line number."""
    path = Path(path)
    if path.is_dir():
        raise BloodcellError(f"{path}: is a folder, expected a corrections CSV file")
    if not path.is_file():
        raise BloodcellError(f"{path}: corrections file not found")
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:  # -sig: a CSV edited in Excel has a BOM
            reader = csv.DictReader(f)
            if reader.fieldnames is None:
                raise BloodcellError(f"{path}: corrections file is empty (expected a header line)")
            reader.fieldnames = [(h or "").strip().lower() for h in reader.fieldnames]
            fields = set(reader.fieldnames)
            if "action" not in fields or not ({"path"} <= fields or {"split", "index"} <= fields):
                raise BloodcellError(f"{path}: expected an 'action' column and 'path' or 'split,index' columns, "
                                     f"found {reader.fieldnames}")
            rows = []
            for r in reader:
                line = reader.line_num
                if r.get(None):
                    raise BloodcellError(f"{path}:{line}: more fields than the header has (quote values with commas)")
                action = (r.get("action") or "").strip().lower() or "keep"
                if action not in ACTIONS:
                    raise BloodcellError(f"{path}:{line}: action '{action}' is not one of keep, relabel, drop")
                if action != "keep":
                    rows.append({**{k: (v or "").strip() for k, v in r.items() if k}, "action": action, "line": line})
    except UnicodeDecodeError as e:
        raise BloodcellError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start}); save it as CSV UTF-8") from None
    except csv.Error as e:
        raise BloodcellError(f"{path}: not a valid CSV file ({e})") from None
    return rows


def _class_id(value: str, class_names: list[str], where: str) -> int:
    if value in class_names:
        return class_names.index(value)
    if value.isdecimal() and int(value) < len(class_names):
        return int(value)
    raise BloodcellError(f"{where}: label '{value}' is not a class ({', '.join(class_names)})")


def _locate(row: dict, meta: dict, sizes: dict[str, int], where: str) -> tuple[str, int]:
    """(split, index) of the image a row names: by path when both sides have paths, else split+index."""
    paths = meta.get("paths") or {}
    if row.get("path") and paths:
        for s in SPLITS:
            if row["path"] in paths.get(s, []):
                return s, paths[s].index(row["path"])
        raise BloodcellError(f"{where}: path '{row['path']}' is not in the dataset")
    split, index = row.get("split", ""), row.get("index", "")
    if row.get("path") and not (split or index):
        raise BloodcellError(f"{where}: the dataset recorded no file paths, so rows must name images by split and "
                             f"index (path '{row['path']}' cannot be looked up)")
    if split not in SPLITS or not index.isdecimal() or int(index) >= sizes[split]:
        raise BloodcellError(f"{where}: split '{split}' / index '{index}' does not name an image of the dataset")
    return split, int(index)


def apply_corrections(arrays: dict[str, np.ndarray], meta: dict, csv_path: str | Path
                      ) -> tuple[dict[str, np.ndarray], dict, dict]:
    """New arrays and metadata with the CSV's relabels and drops applied, plus a summary.

    ``arrays`` are MedMNIST-style (``{split}_images``, ``{split}_labels``); ``meta`` has ``class_names`` and,
    optionally, ``paths`` per split (kept in step with dropped images). Inputs are not modified.
    """
    csv_path = Path(csv_path)
    classes = list(meta["class_names"])
    sizes = {s: len(arrays[f"{s}_labels"]) for s in SPLITS}
    labels = {s: np.asarray(arrays[f"{s}_labels"]).reshape(-1).astype(np.int64).copy() for s in SPLITS}
    drop: dict[str, set[int]] = {s: set() for s in SPLITS}
    relabelled = 0
    named: dict[tuple[str, int], int] = {}
    for row in read_corrections(csv_path):
        where = f"{csv_path}:{row['line']}"
        split, i = _locate(row, meta, sizes, where)
        if (split, i) in named:  # two actions for one image: which one is meant is anyone's guess
            raise BloodcellError(f"{where}: {split} #{i} already has an action on line {named[split, i]}")
        named[split, i] = row["line"]
        if row.get("given_label") and _class_id(row["given_label"], classes, where) != labels[split][i]:
            raise BloodcellError(f"{where}: given_label '{row['given_label']}' but the dataset has "
                                 f"'{classes[labels[split][i]]}' for {split} #{i} (CSV for another dataset version?)")
        if row["action"] == "drop":
            drop[split].add(i)
        else:
            if not row.get("new_label"):
                raise BloodcellError(f"{where}: action relabel needs a new_label")
            labels[split][i] = _class_id(row["new_label"], classes, where)
            relabelled += 1
    out, new_meta = dict(arrays), dict(meta)
    paths = meta.get("paths")
    new_paths = {}
    for s in SPLITS:
        keep = np.array([i not in drop[s] for i in range(sizes[s])], dtype=bool)
        if not keep.any():
            raise BloodcellError(f"{csv_path}: the corrections would leave the {s} split empty")
        out[f"{s}_images"] = arrays[f"{s}_images"][keep]
        out[f"{s}_labels"] = labels[s][keep].reshape(-1, 1).astype(np.asarray(arrays[f"{s}_labels"]).dtype)
        if paths and s in paths:
            new_paths[s] = [p for p, k in zip(paths[s], keep) if k]
    if paths:
        new_meta["paths"] = {**paths, **new_paths}
    new_meta["counts"] = {s: np.bincount(out[f"{s}_labels"].reshape(-1), minlength=len(classes)).tolist()
                          for s in SPLITS}
    summary = {"file": str(csv_path.resolve()), "sha256": hashlib.sha256(csv_path.read_bytes()).hexdigest(),
               "relabelled": relabelled, "dropped": sum(len(v) for v in drop.values())}
    new_meta["corrections"] = summary
    return out, new_meta, summary
