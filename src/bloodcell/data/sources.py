"""Where datasets come from: a folder per class (the PBC layout), an official npz, or a download."""

from __future__ import annotations

import csv
import hashlib
import os
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

from bloodcell import __version__
from bloodcell.data.images import ImageDecodeError, load_rgb
from bloodcell.data.recipe import Recipe, apply_recipe
from bloodcell.data.store import (
    BLOODMNIST_CLASSES,
    SPLITS,
    dataset_paths,
    read_npz,
    write_dataset,
)
from bloodcell.errors import BloodcellError
from bloodcell.io import read_json

SPLIT_FRACTIONS = (0.7, 0.1, 0.2)


def scan_class_folders(source: Path) -> tuple[list[str], list[tuple[str, int]]]:
    """Class names (sorted sub-folder names) and (relative path, class id) of every file under them."""
    if not source.exists():
        raise BloodcellError(f"{source}: source folder not found")
    if not source.is_dir():
        raise BloodcellError(f"{source}: not a folder (expected one sub-folder per class)")
    classes = sorted(d.name for d in source.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not classes:
        raise BloodcellError(f"{source}: no class sub-folders found (expected one folder per class)")
    items: list[tuple[str, int]] = []
    for i, c in enumerate(classes):
        files = sorted(
            f for f in (source / c).rglob("*") if f.is_file() and not f.name.startswith(".")
        )
        if not files:
            raise BloodcellError(f"{source / c}: class folder '{c}' is empty")
        items.extend((f.relative_to(source).as_posix(), i) for f in files)
    return classes, items


def read_split_file(path: Path, source: Path, classes: list[str]) -> list[tuple[str, int, str]]:
    """Rows (relative path, label, split) of a ``path,label,split`` CSV, checked against the source."""
    if not path.is_file():
        raise BloodcellError(f"{path}: split file not found")
    rows = []
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        need = {"path", "label", "split"}
        if not reader.fieldnames or not need <= set(reader.fieldnames):
            raise BloodcellError(f"{path}: expected columns path,label,split, found {reader.fieldnames}")
        for n, r in enumerate(reader, start=2):
            split = r["split"].strip()
            if split not in SPLITS:
                raise BloodcellError(f"{path}:{n}: split '{split}' is not one of train, val, test")
            try:
                label = int(r["label"])
            except ValueError:
                raise BloodcellError(f"{path}:{n}: label '{r['label']}' is not an integer") from None
            rows.append((r["path"].strip(), label, split))
    if not rows:
        raise BloodcellError(f"{path}: split file has no rows")
    missing = [p for p, _, _ in rows if not (source / p).is_file()]
    if missing:
        more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
        raise BloodcellError(
            f"{path}: names {len(missing)} file(s) missing under {source}: {', '.join(missing[:3])}{more}"
        )
    return rows


def class_names_from_split(rows: list[tuple[str, int, str]], split_path: Path) -> list[str]:
    """Label id -> name, taken from the folder each label's files are in (must be one folder per label)."""
    folders: dict[int, set[str]] = {}
    for p, label, _ in rows:
        folders.setdefault(label, set()).add(Path(p).parts[0] if len(Path(p).parts) > 1 else "?")
    ids = sorted(folders)
    if ids != list(range(len(ids))):
        raise BloodcellError(f"{split_path}: labels must be 0..K-1 without gaps, found {ids}")
    names = []
    for i in ids:
        if len(folders[i]) != 1:
            raise BloodcellError(f"{split_path}: label {i} spans folders {sorted(folders[i])}")
        names.append(folders[i].pop())
    return names


def stratified_split(labels: np.ndarray, seed: int) -> np.ndarray:
    """A seeded stratified 70/10/20 assignment: array of 'train'/'val'/'test'."""
    from sklearn.model_selection import train_test_split

    idx = np.arange(len(labels))
    try:
        n_test, n_val = round(SPLIT_FRACTIONS[2] * len(idx)), round(SPLIT_FRACTIONS[1] * len(idx))
        rest, test = train_test_split(idx, test_size=n_test, stratify=labels, random_state=seed)
        train, val = train_test_split(rest, test_size=n_val, stratify=labels[rest], random_state=seed)
    except ValueError as e:
        raise BloodcellError(f"cannot make a stratified 70/10/20 split: {e}") from None
    out = np.empty(len(labels), dtype=object)
    out[train], out[val], out[test] = "train", "val", "test"
    return out


def _decode_one(args: tuple[str, int, int]) -> tuple[np.ndarray | None, str | None]:
    path, size, crop = args
    try:
        return apply_recipe(load_rgb(path), Recipe(size, crop)), None
    except ImageDecodeError as e:
        return None, str(e)


def decode_all(paths: list[Path], recipe: Recipe, workers: int | None = None, progress: bool = True):
    """Decode and resize every file on all cores; returns (images or None per file, reasons)."""
    from tqdm import tqdm

    workers = workers or os.cpu_count() or 1
    jobs = [(str(p), recipe.size, recipe.crop) for p in paths]
    bar = dict(total=len(jobs), desc="decode", unit="img", disable=not progress, mininterval=0.5)
    if workers == 1 or len(jobs) < 256:
        results = [_decode_one(j) for j in tqdm(jobs, **bar)]
    else:
        with ProcessPoolExecutor(max_workers=workers) as pool:
            results = list(tqdm(pool.map(_decode_one, jobs, chunksize=128), **bar))
    return [r[0] for r in results], [r[1] for r in results]


def fingerprint(source: Path, rel_paths: list[str], extra: dict) -> str:
    """Hash of every input file's bytes, its path, and the recipe/split settings."""
    h = hashlib.sha256(repr(sorted(extra.items())).encode())
    for rel in rel_paths:
        h.update(rel.encode())
        h.update(hashlib.sha256((source / rel).read_bytes()).digest())
    return h.hexdigest()


def prepare_from_folder(
    source: str | Path,
    size: int = 64,
    crop: int = 200,
    split_file: str | Path | None = None,
    name: str | None = None,
    seed: int = 0,
    root: str | Path | None = None,
    force: bool = False,
    workers: int | None = None,
    progress: bool = True,
    corrections: str | Path | None = None,
) -> dict:
    """Import a folder-per-class tree with the MedMNIST recipe; reuse the cache when nothing changed.

    ``corrections``: a reviewed CSV from ``bloodcell review`` (keep / relabel / drop), applied after the
    import and recorded, with its hash, in the metadata.
    """
    source = Path(source).expanduser()
    classes, items = scan_class_folders(source)
    name = name or source.resolve().name
    recipe = Recipe(size=size, crop=crop)
    split_bytes = b""
    if split_file:
        split_path = Path(split_file).expanduser()
        rows = read_split_file(split_path, source, classes)
        split_bytes = split_path.read_bytes()
        classes = class_names_from_split(rows, split_path)
        rel_paths = [r[0] for r in rows]
        labels = np.array([r[1] for r in rows], dtype=np.int64)
        splits = np.array([r[2] for r in rows], dtype=object)
        split_source = {"kind": "file", "path": str(split_path.resolve())}
    else:
        rel_paths = [p for p, _ in items]
        labels = np.array([c for _, c in items], dtype=np.int64)
        splits = None
        split_source = {"kind": "stratified", "fractions": SPLIT_FRACTIONS, "seed": seed}

    extra = {"recipe": str(recipe.to_dict()), "split": hashlib.sha256(split_bytes).hexdigest(),
             "split_source": str(split_source.get("fractions")), "seed": seed if splits is None else None,
             "corrections": _file_hash(corrections)}
    fp = fingerprint(source, rel_paths, extra)
    npz_path, json_path = dataset_paths(name, size, root)
    if not force and npz_path.is_file() and json_path.is_file():
        old = read_json(json_path)
        if old.get("fingerprint") == fp:
            return {**old, "reused": True, "npz": str(npz_path), "json": str(json_path)}

    t0 = time.perf_counter()
    images, reasons = decode_all([source / p for p in rel_paths], recipe, workers, progress)
    decode_s = time.perf_counter() - t0
    ok = np.array([im is not None for im in images])
    skipped = [{"path": rel_paths[i], "reason": reasons[i]} for i in np.flatnonzero(~ok)]
    if not ok.any():
        raise BloodcellError(f"{source}: none of the {len(rel_paths)} files could be decoded as an image")
    keep = np.flatnonzero(ok)
    stack = np.stack([images[i] for i in keep])
    labels, kept_paths = labels[keep], [rel_paths[i] for i in keep]
    splits = splits[keep] if splits is not None else stratified_split(labels, seed)

    arrays, split_paths = {}, {}
    for s in SPLITS:
        m = splits == s
        if not m.any():
            raise BloodcellError(f"{split_file or source}: the {s} split would be empty")
        arrays[f"{s}_images"], arrays[f"{s}_labels"] = stack[m], labels[m]
        split_paths[s] = [p for p, keep_it in zip(kept_paths, m) if keep_it]
    meta = {
        "name": name,
        "size": size,
        "class_names": classes,
        "recipe": recipe.to_dict(),
        "source": {"kind": "folder", "path": str(source.resolve()), "files": len(rel_paths)},
        "split_source": split_source,
        "fingerprint": fp,
        "counts": {s: np.bincount(arrays[f"{s}_labels"], minlength=len(classes)).tolist() for s in SPLITS},
        "skipped": skipped,
        "paths": split_paths,
        "decode_seconds": round(decode_s, 2),
        "bloodcell_version": __version__,
    }
    arrays, meta = _maybe_correct(arrays, meta, corrections)
    write_dataset(name, size, arrays, meta, root)
    return {**meta, "reused": False, "npz": str(npz_path), "json": str(json_path)}


def _file_hash(path: str | Path | None) -> str | None:
    if not path:
        return None
    p = Path(path)
    if not p.is_file():
        raise BloodcellError(f"{p}: corrections file not found")
    return hashlib.sha256(p.read_bytes()).hexdigest()


def _maybe_correct(arrays: dict, meta: dict, corrections: str | Path | None) -> tuple[dict, dict]:
    if not corrections:
        return arrays, meta
    from bloodcell.data.corrections import apply_corrections

    arrays, meta, _ = apply_corrections(arrays, meta, corrections)
    return arrays, meta


def prepare_from_npz(
    path: str | Path, name: str | None = None, size: int | None = None, root: str | Path | None = None,
    corrections: str | Path | None = None,
) -> dict:
    """Register an official (or any MedMNIST-format) npz as a prepared dataset."""
    path = Path(path).expanduser()
    arrays = read_npz(path, num_classes=len(BLOODMNIST_CLASSES))
    actual = int(arrays["train_images"].shape[1])
    if size is not None and size != actual:
        raise BloodcellError(f"{path}: images are {actual}x{actual}, but --size {size} was asked for")
    name = name or "bloodmnist"
    meta = {
        "name": name,
        "size": actual,
        "class_names": list(BLOODMNIST_CLASSES),
        "recipe": Recipe(size=actual).to_dict(),
        "source": {"kind": "npz", "path": str(path.resolve())},
        "split_source": {"kind": "npz"},
        "fingerprint": hashlib.sha256(path.read_bytes() + (_file_hash(corrections) or "").encode()).hexdigest(),
        "counts": {s: np.bincount(arrays[f"{s}_labels"].reshape(-1), minlength=8).tolist() for s in SPLITS},
        "skipped": [],
        "bloodcell_version": __version__,
    }
    arrays, meta = _maybe_correct(arrays, meta, corrections)
    npz_path, json_path = write_dataset(name, actual, arrays, meta, root)
    return {**meta, "reused": False, "npz": str(npz_path), "json": str(json_path)}


def download_bloodmnist(size: int = 64, root: str | Path | None = None) -> dict:
    """Fetch the official BloodMNIST npz through ``medmnist`` (which checks its MD5), then register it."""
    from bloodcell.data.store import data_dir

    fname = "bloodmnist.npz" if size == 28 else f"bloodmnist_{size}.npz"
    how = (
        f"download {fname} (MedMNIST release, see medmnist.com) on a machine with internet access, then run "
        f"'bloodcell data prepare --npz {fname}' (or prepare the PBC images with "
        f"'bloodcell data prepare --source DIR')"
    )
    try:
        import medmnist
    except ImportError:
        raise BloodcellError(
            f"downloading BloodMNIST needs the medmnist package (pip install 'bloodcell[download]'); or {how}"
        ) from None
    target = data_dir(root) / "downloads"
    target.mkdir(parents=True, exist_ok=True)
    try:
        medmnist.BloodMNIST(split="train", download=True, size=size, root=str(target))
    except Exception as e:  # network errors come in many types (URLError, RuntimeError, OSError ...)
        lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
        msg = f"{type(e).__name__}: {lines[0]}" if lines else type(e).__name__
        raise BloodcellError(f"could not download BloodMNIST at {size}px ({msg}); {how}") from None
    return prepare_from_npz(target / fname, name="bloodmnist", size=size, root=root)
