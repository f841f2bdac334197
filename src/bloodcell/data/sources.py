"""Where datasets come from: a folder per class (the PBC layout), an official npz, or a download; stored as an
npz (in memory when used) or, for data larger than memory, as memory-mapped shards."""

from __future__ import annotations

import csv
import hashlib
import os
import time
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import numpy as np

from bloodcell import __version__
from bloodcell.data.images import ImageDecodeError, get_max_pixels, load_rgb, set_max_pixels
from bloodcell.data.recipe import Recipe, apply_recipe
from bloodcell.data.shards import (
    ShardedArray,
    ShardWriter,
    check_layout,
    default_chunk_images,
    open_staged,
    result_paths,
    reusable,
    staging_folder,
    write_sharded_dataset,
)
from bloodcell.data.store import (
    BLOODMNIST_CLASSES,
    SIZES,
    SPLITS,
    check_dataset_name,
    default_class_names,
    num_labels,
    read_npz,
    require_two_classes,
    validate_npz_arrays,
    write_dataset,
)
from bloodcell.errors import BloodcellError
from bloodcell.io import file_sha256, read_json, warn

SPLIT_FRACTIONS = (0.7, 0.1, 0.2)


HIDDEN_FILE = "hidden file (name starts with '.'), not imported"
HIDDEN_FOLDER = "hidden folder (name starts with '.'), not imported"


def scan_class_folders(source: Path, hidden: list[dict] | None = None) -> tuple[list[str], list[tuple[str, int]]]:
    """Class names (sorted sub-folder names) and (relative path, class id) of every file under them.

    Hidden files and folders inside the class folders (e.g. macOS ``._x.jpg``, ``.DS_Store``) are not
    imported; when ``hidden`` is a list, each one is appended to it as ``{"path", "reason"}`` so callers can
    say what they left out.
    """
    source = Path(source)
    if not source.exists():
        raise BloodcellError(f"{source}: source folder not found")
    if not source.is_dir():
        raise BloodcellError(f"{source}: not a folder (expected one sub-folder per class)")
    classes = sorted(d.name for d in source.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not classes:
        raise BloodcellError(f"{source}: no class sub-folders found (expected one folder per class)")
    items: list[tuple[str, int]] = []
    found_hidden: list[dict] = []
    for i, c in enumerate(classes):
        files, skipped = _walk_class_folder(source, source / c)
        found_hidden += skipped
        if not files:
            only = f" (only hidden files: {', '.join(h['path'] for h in skipped[:3])})" if skipped else ""
            raise BloodcellError(f"{source / c}: class folder '{c}' is empty{only}")
        items.extend((f.relative_to(source).as_posix(), i) for f in files)
    if hidden is not None:
        hidden.extend(sorted(found_hidden, key=lambda h: h["path"]))
    return classes, items


def _walk_class_folder(source: Path, folder: Path) -> tuple[list[Path], list[dict]]:
    """Files under ``folder`` in the order ``sorted(rglob)`` gives, minus hidden files and hidden folders."""
    files, hidden = [], []
    for dirpath, dirnames, filenames in os.walk(folder):
        here = Path(dirpath)
        for d in sorted(dirnames):
            if d.startswith("."):
                hidden.append({"path": (here / d).relative_to(source).as_posix() + "/", "reason": HIDDEN_FOLDER})
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        for f in filenames:
            p = here / f
            if f.startswith("."):
                hidden.append({"path": p.relative_to(source).as_posix(), "reason": HIDDEN_FILE})
            elif p.is_file():
                files.append(p)
    return sorted(files), hidden


def read_split_file(path: Path, source: Path, classes: list[str],
                    notes: list[str] | None = None) -> list[tuple[str, int, str]]:
    """Rows (relative path, label, split) of a ``path,label,split`` CSV, checked against the source.

    A row's label must be the index of the sorted class folder its file is in, so a split file made for
    other folders (or with labels shifted by one) fails instead of silently mislabelling. A file listed in
    two splits, or with two labels, is an error; exact duplicate rows are dropped with a warning (also
    appended to ``notes`` when given).
    """
    path = Path(path)
    if path.is_dir():
        raise BloodcellError(f"{path}: is a folder, expected a split CSV file (path,label,split)")
    if not path.is_file():
        raise BloodcellError(f"{path}: split file not found")
    folders = ", ".join(f"{i}={c}" for i, c in enumerate(classes))
    rows: list[tuple[str, int, str]] = []
    seen: dict[str, tuple[int, int, str]] = {}
    duplicates: dict[str, list[int]] = {}
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:  # -sig: Excel writes a byte-order mark
            reader = csv.DictReader(f)
            if reader.fieldnames is None:
                raise BloodcellError(f"{path}: split file is empty (expected a header line path,label,split)")
            reader.fieldnames = [(h or "").strip().lower() for h in reader.fieldnames]
            need = {"path", "label", "split"}
            if not need <= set(reader.fieldnames):
                raise BloodcellError(f"{path}: expected columns path,label,split, found {reader.fieldnames}")
            for r in reader:
                where = f"{path}:{reader.line_num}"
                if r.get(None):
                    raise BloodcellError(f"{where}: more fields than the header has (a path with a comma must be "
                                         f"quoted)")
                if any(r[c] is None for c in need):
                    raise BloodcellError(f"{where}: too few fields, expected path,label,split")
                rel, label_s, split = r["path"].strip(), r["label"].strip(), r["split"].strip()
                if not rel:
                    raise BloodcellError(f"{where}: empty path")
                if split not in SPLITS:
                    raise BloodcellError(f"{where}: split '{split}' is not one of train, val, test")
                try:
                    label = int(label_s)
                except ValueError:
                    raise BloodcellError(f"{where}: label '{label_s}' is not an integer") from None
                rel = _normalise_row_path(rel, where)
                if rel in seen:
                    line, old_label, old_split = seen[rel]
                    if old_label != label:
                        raise BloodcellError(f"{where}: {rel} is listed again with label {label} "
                                             f"(line {line} gives label {old_label})")
                    if old_split != split:
                        raise BloodcellError(f"{path}: {rel} is listed in two splits, {old_split} (line {line}) "
                                             f"and {split} (line {reader.line_num})")
                    duplicates.setdefault(rel, [line]).append(reader.line_num)
                    continue
                _check_row_label(rel, label, classes, where, folders)
                seen[rel] = (reader.line_num, label, split)
                rows.append((rel, label, split))
    except UnicodeDecodeError as e:
        raise BloodcellError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start}); save it as CSV UTF-8") from None
    except csv.Error as e:
        raise BloodcellError(f"{path}: not a valid CSV file ({e})") from None
    if not rows:
        raise BloodcellError(f"{path}: split file has no rows")
    if duplicates:
        listed = [f"{p} (lines {', '.join(map(str, lines))})" for p, lines in list(duplicates.items())[:3]]
        more = f" and {len(duplicates) - 3} more" if len(duplicates) > 3 else ""
        msg = f"{path}: {len(duplicates)} file(s) listed more than once, duplicates ignored: {', '.join(listed)}{more}"
        warn(msg)
        if notes is not None:
            notes.append(msg)
    missing = [p for p, _, _ in rows if not (source / p).is_file()]
    if missing:
        more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
        raise BloodcellError(
            f"{path}: names {len(missing)} file(s) missing under {source}: {', '.join(missing[:3])}{more}"
        )
    return rows


def _normalise_row_path(rel: str, where: str) -> str:
    """A row's path as ``class/.../file`` (``./a//b`` -> ``a/b``); absolute paths and ``..`` are refused."""
    p = PurePosixPath(rel)
    if p.is_absolute() or ".." in p.parts:
        raise BloodcellError(f"{where}: path '{rel}' must be relative to the source folder, like class/file.jpg")
    if len(p.parts) < 2 and "\\" in rel:
        raise BloodcellError(f"{where}: path '{rel}' must separate folders with '/', like class/file.jpg")
    if len(p.parts) < 2:
        raise BloodcellError(f"{where}: path '{rel}' is not inside a class folder (expected class/file.jpg)")
    return p.as_posix()


def _check_row_label(rel: str, label: int, classes: list[str], where: str, folders: str) -> None:
    """The label must be the sorted index of the class folder the file is in."""
    if not 0 <= label < len(classes):
        raise BloodcellError(f"{where}: label {label} is outside 0..{len(classes) - 1}: there are {len(classes)} "
                             f"class folders ({folders})")
    folder = rel.split("/", 1)[0]
    if folder != classes[label]:
        if folder not in classes:
            raise BloodcellError(f"{where}: '{rel}' is not in one of the class folders ({folders})")
        raise BloodcellError(f"{where}: '{rel}' is in class folder '{folder}' (label {classes.index(folder)}) but the "
                             f"row says label {label} ('{classes[label]}'); labels are the sorted folders' "
                             f"indices ({folders})")


def class_names_from_split(rows: list[tuple[str, int, str]], split_path: Path) -> list[str]:
    """Label id -> name, taken from the folder each label's files are in (must be one folder per label)."""
    folders: dict[int, set[str]] = {}
    for p, label, _ in rows:
        folders.setdefault(label, set()).add(Path(p).parts[0] if len(Path(p).parts) > 1 else "?")
    ids = sorted(folders)
    if ids != list(range(len(ids))):
        absent = sorted(set(range(ids[-1] + 1)) - set(ids))
        raise BloodcellError(f"{split_path}: no rows with label(s) {', '.join(map(str, absent))}; labels must be "
                             f"0..K-1 without gaps, found {ids}")
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


def check_workers(workers: int | None, option: str = "--workers") -> None:
    if workers is not None and (isinstance(workers, bool) or not isinstance(workers, int) or workers < 1):
        raise BloodcellError(f"{option} must be a whole number >= 1, got {workers!r}")


def decode_all(paths: list[Path], recipe: Recipe, workers: int | None = None, progress: bool = True):
    """Decode and resize every file on all cores; returns (images or None per file, reasons)."""
    from tqdm import tqdm

    check_workers(workers)
    workers = workers or os.cpu_count() or 1
    jobs = [(str(p), recipe.size, recipe.crop) for p in paths]
    bar = dict(total=len(jobs), desc="decode", unit="img", disable=not progress, mininterval=0.5)
    if workers == 1 or len(jobs) < 256:
        results = [_decode_one(j) for j in tqdm(jobs, **bar)]
    else:
        # workers start with the default pixel limit when spawned, so they are given this process's
        with ProcessPoolExecutor(max_workers=workers, initializer=set_max_pixels, initargs=(get_max_pixels(),)) as pool:
            results = list(tqdm(pool.map(_decode_one, jobs, chunksize=128), **bar))
    return [r[0] for r in results], [r[1] for r in results]


def fingerprint(source: Path, rel_paths: list[str], extra: dict) -> str:
    """Hash of every input file's bytes, its path, and the recipe/split settings.

    An unreadable file hashes as its error, so it fails later, in decoding, where it is reported as skipped.
    """
    h = hashlib.sha256(repr(sorted(extra.items())).encode())
    for rel in rel_paths:
        h.update(rel.encode())
        try:
            h.update(bytes.fromhex(file_sha256(source / rel)))
        except OSError as e:
            h.update(f"unreadable: {type(e).__name__}".encode())
    return h.hexdigest()


@dataclass
class FolderImport:
    """What a folder import will read and how it splits it, decided before any image is decoded."""

    source: Path
    recipe: Recipe
    name: str
    classes: list[str]
    rel_paths: list[str]
    labels: np.ndarray
    splits: np.ndarray | None  # from the split file; None: stratified once the decodable files are known
    split_source: dict
    split_file: str | Path | None
    seed: int
    hidden: list[dict]
    notes: list[str]
    fingerprint: str


@dataclass
class KeptImages:
    """Each split's images as positions in the sequence of decodable files, with their labels and paths."""

    positions: dict[str, np.ndarray]
    labels: dict[str, np.ndarray]
    paths: dict[str, list[str]]
    skipped: list[dict]


def prepare_from_folder(
    source: str | Path,
    *,
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
    layout: str = "npz",
    shard_images: int | None = None,
    chunk_images: int | None = None,
) -> dict:
    """Import a folder-per-class tree with the MedMNIST recipe; reuse the cache when nothing changed.

    ``corrections``: a reviewed CSV from ``bloodcell review`` (keep / relabel / drop), applied after the
    import and recorded, with its hash, in the metadata. Every file that is not imported is named in
    ``skipped``: undecodable files and (without a split file) hidden files and folders in the class folders.
    ``layout="shards"`` stores a dataset larger than memory as memory-mapped shards (``bloodcell.data.shards``),
    decoding ``chunk_images`` files at a time, so memory holds a chunk and a shard, never the dataset; the
    images are the same as the npz layout's.
    """
    recipe = Recipe(size=size, crop=crop)  # first: a bad --crop or --size fails before any file is read
    check_workers(workers)
    check_layout(layout, shard_images, chunk_images)
    plan = plan_folder_import(source, recipe=recipe, split_file=split_file, name=name, seed=seed,
                              corrections=corrections)
    cached = None if force else reusable(plan.name, size, root, plan.fingerprint, layout)
    if cached:
        return cached
    if layout == "shards":
        return _import_as_shards(plan, root=root, workers=workers, progress=progress, corrections=corrections,
                                 shard_images=shard_images, chunk_images=chunk_images)
    t0 = time.perf_counter()
    images, reasons = decode_all([plan.source / p for p in plan.rel_paths], recipe, workers, progress)
    decode_s = time.perf_counter() - t0
    ok = np.array([im is not None for im in images])
    kept = assign_splits(plan, ok, reasons)
    stack = np.stack([images[i] for i in np.flatnonzero(ok)])
    arrays = {}
    for s in SPLITS:
        arrays[f"{s}_images"], arrays[f"{s}_labels"] = stack[kept.positions[s]], kept.labels[s]
    meta = folder_meta(plan, kept, decode_s)
    arrays, meta = _maybe_correct(arrays, meta, corrections)
    write_dataset(plan.name, size, arrays, meta, root)
    return {**meta, "reused": False, **result_paths(plan.name, size, root, "npz")}


def plan_folder_import(source: str | Path, *, recipe: Recipe, split_file: str | Path | None, name: str | None,
                       seed: int, corrections: str | Path | None) -> FolderImport:
    """Scan the class folders, read the split file, and fingerprint every input, before decoding anything."""
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise BloodcellError(f"--seed must be a whole number >= 0, got {seed!r}")
    source = Path(source).expanduser()
    hidden: list[dict] = []
    classes, items = scan_class_folders(source, hidden)
    if len(classes) < 2:
        raise BloodcellError(f"{source}: need at least 2 classes, found 1 class folder ('{classes[0]}'); "
                             f"expected one sub-folder per class")
    name = check_dataset_name(name or source.resolve().name)
    split_bytes = b""
    notes: list[str] = []
    if split_file:
        split_path = Path(split_file).expanduser()
        rows = read_split_file(split_path, source, classes, notes)
        split_bytes = split_path.read_bytes()
        classes = class_names_from_split(rows, split_path)
        rel_paths = [r[0] for r in rows]
        labels = np.array([r[1] for r in rows], dtype=np.int64)
        splits = np.array([r[2] for r in rows], dtype=object)
        split_source = {"kind": "file", "path": str(split_path.resolve())}
        for s in SPLITS:  # before decoding: a split file without val rows fails in a second, not after minutes
            if not (splits == s).any():
                raise BloodcellError(f"{split_path}: no rows for the {s} split")
        require_two_classes({s: labels[splits == s] for s in SPLITS}, str(split_path), classes)
        hidden = []  # the split file says what is imported; hidden files it does not name are not "skipped"
    else:
        rel_paths = [p for p, _ in items]
        labels = np.array([c for _, c in items], dtype=np.int64)
        splits = None
        split_source = {"kind": "stratified", "fractions": SPLIT_FRACTIONS, "seed": seed}

    extra = {"recipe": str(recipe.to_dict()), "split": hashlib.sha256(split_bytes).hexdigest(),
             "split_source": str(split_source.get("fractions")), "seed": seed if splits is None else None,
             "corrections": _file_hash(corrections)}
    if hidden:  # only then, so datasets without hidden files keep the fingerprints they had
        extra["hidden"] = repr([h["path"] for h in hidden])
    return FolderImport(source, recipe, name, classes, rel_paths, labels, splits, split_source, split_file, seed,
                        hidden, notes, fingerprint(source, rel_paths, extra))


def assign_splits(plan: FolderImport, ok: np.ndarray, reasons: list[str | None]) -> KeptImages:
    """Which decodable files go to which split (the split file's, or a stratified one of the decodable files);
    one-line errors when a class or a split would be left without images."""
    source, classes, rel_paths, labels = plan.source, plan.classes, plan.rel_paths, plan.labels
    failed = [{"path": rel_paths[i], "reason": reasons[i]} for i in np.flatnonzero(~ok)]
    skipped = sorted(plan.hidden + failed, key=lambda x: x["path"])
    if not ok.any():
        raise BloodcellError(f"{source}: none of the {len(rel_paths)} files could be decoded as an image "
                             f"(e.g. {failed[0]['path']}: {failed[0]['reason']})")
    keep = np.flatnonzero(ok)
    for c in np.flatnonzero(np.bincount(labels[keep], minlength=len(classes)) == 0):
        bad = [f for f, y in zip(failed, labels[~ok]) if y == c]
        example = f" (e.g. {bad[0]['path']}: {bad[0]['reason']})" if bad else ""
        raise BloodcellError(f"{source / classes[c]}: none of the {len(bad)} file(s) of class '{classes[c]}' could "
                             f"be decoded as an image{example}")
    kept_labels, kept_paths = labels[keep], [rel_paths[i] for i in keep]
    splits = plan.splits[keep] if plan.splits is not None else stratified_split(kept_labels, plan.seed)
    positions, split_labels, split_paths = {}, {}, {}
    for s in SPLITS:
        m = splits == s
        if not m.any():
            raise BloodcellError(f"{plan.split_file or source}: the {s} split would be empty")
        positions[s], split_labels[s] = np.flatnonzero(m), kept_labels[m]
        split_paths[s] = [p for p, keep_it in zip(kept_paths, m) if keep_it]
    require_two_classes(split_labels, f"{plan.split_file or source} (after skipping {len(failed)} undecodable "
                        f"file(s))", classes)
    return KeptImages(positions, split_labels, split_paths, skipped)


def folder_meta(plan: FolderImport, kept: KeptImages, decode_s: float) -> dict:
    """The dataset metadata a folder import records (the same for both layouts)."""
    return {
        "name": plan.name,
        "size": plan.recipe.size,
        "class_names": plan.classes,
        "recipe": plan.recipe.to_dict(),
        "source": {"kind": "folder", "path": str(plan.source.resolve()), "files": len(plan.rel_paths)},
        "split_source": plan.split_source,
        "fingerprint": plan.fingerprint,
        "counts": {s: np.bincount(kept.labels[s], minlength=len(plan.classes)).tolist() for s in SPLITS},
        "skipped": kept.skipped,
        "warnings": plan.notes,
        "paths": kept.paths,
        "decode_seconds": round(decode_s, 2),
        "bloodcell_version": __version__,
    }


def iter_decoded(paths: list[Path], recipe: Recipe, workers: int | None = None, progress: bool = True,
                 chunk: int = 4096) -> Iterator[tuple[list[np.ndarray | None], list[str | None]]]:
    """``decode_all`` ``chunk`` files at a time, in order: (images or None per file, reasons) per chunk, so only
    one chunk of decoded images exists at once. The worker processes are started once, for all chunks."""
    from tqdm import tqdm

    check_workers(workers)
    workers = workers or os.cpu_count() or 1
    jobs = [(str(p), recipe.size, recipe.crop) for p in paths]
    bar = tqdm(total=len(jobs), desc="decode", unit="img", disable=not progress, mininterval=0.5)
    pool = None
    if workers > 1 and len(jobs) >= 256:
        pool = ProcessPoolExecutor(max_workers=workers, initializer=set_max_pixels, initargs=(get_max_pixels(),))
    try:
        for i in range(0, len(jobs), chunk):
            part = jobs[i : i + chunk]
            if pool is None:
                results = [_decode_one(j) for j in part]
            else:
                results = list(pool.map(_decode_one, part, chunksize=max(1, min(128, len(part) // (4 * workers)))))
            bar.update(len(part))
            yield [r[0] for r in results], [r[1] for r in results]
    finally:
        bar.close()
        if pool is not None:
            pool.shutdown(cancel_futures=True)


def decode_to_staging(plan: FolderImport, folder: Path, *, workers: int | None, progress: bool,
                      chunk: int) -> tuple[ShardedArray | None, np.ndarray, list[str | None]]:
    """Decode every file a chunk at a time, appending the decodable ones (in file order) to staging shards
    in ``folder``; the staged images as one lazy array, which files decoded, and why the others did not."""
    size = plan.recipe.size
    writer = ShardWriter(folder, "staged", size, shard_images=chunk)
    ok, reasons = [], []
    for images, why in iter_decoded([plan.source / p for p in plan.rel_paths], plan.recipe, workers, progress,
                                    chunk):
        for im in images:
            if im is not None:
                writer.append(im[None])
        ok += [im is not None for im in images]
        reasons += why
    return open_staged(folder, writer.close(), size), np.array(ok, dtype=bool), reasons


def _import_as_shards(plan: FolderImport, *, root: str | Path | None, workers: int | None, progress: bool,
                      corrections: str | Path | None, shard_images: int | None, chunk_images: int | None) -> dict:
    """The shards layout of a folder import: decode into staging shards (the split needs to know which files
    decode), then copy each split's images into its own shards, a chunk at a time."""
    size = plan.recipe.size
    chunk = chunk_images or default_chunk_images(size)
    with staging_folder(plan.name, size, root) as tmp:
        t0 = time.perf_counter()
        staged, ok, reasons = decode_to_staging(plan, tmp, workers=workers, progress=progress, chunk=chunk)
        decode_s = time.perf_counter() - t0
        kept = assign_splits(plan, ok, reasons)
        # the "images" are positions in the staged images: corrections drop and relabel them as they would pixels
        arrays = {}
        for s in SPLITS:
            arrays[f"{s}_images"], arrays[f"{s}_labels"] = kept.positions[s], kept.labels[s]
        meta = folder_meta(plan, kept, decode_s)
        arrays, meta = _maybe_correct(arrays, meta, corrections)
        images = {s: staged.select(arrays[f"{s}_images"]) for s in SPLITS}
        labels = {s: np.asarray(arrays[f"{s}_labels"]).reshape(-1) for s in SPLITS}
        meta = write_sharded_dataset(plan.name, size, images, labels, meta, root, shard_images=shard_images,
                                     chunk_images=chunk)
    return {**meta, "reused": False, **result_paths(plan.name, size, root, "shards")}


def _file_hash(path: str | Path | None) -> str | None:
    if not path:
        return None
    p = Path(path).expanduser()
    if p.is_dir():
        raise BloodcellError(f"{p}: is a folder, expected a corrections CSV file")
    if not p.is_file():
        raise BloodcellError(f"{p}: corrections file not found")
    return file_sha256(p)


def _maybe_correct(arrays: dict, meta: dict, corrections: str | Path | None) -> tuple[dict, dict]:
    if not corrections:
        return arrays, meta
    from bloodcell.data.corrections import apply_corrections

    arrays, meta, _ = apply_corrections(arrays, meta, Path(corrections).expanduser())
    return arrays, meta


def _npz_class_names(path: Path, k: int, class_names: list[str] | None) -> list[str]:
    """Names for an npz whose labels imply ``k`` classes: given ones, else its own metadata JSON, else defaults."""
    where = "class_names"
    if class_names is None:
        meta_path = path.with_suffix(".json")
        try:
            meta = read_json(meta_path) if meta_path.is_file() else {}
        except BloodcellError:
            meta = {}
        class_names = meta.get("class_names") if isinstance(meta, dict) else None
        where = f"{meta_path}: class_names"
        if class_names is None:
            return default_class_names(k)
    if (not isinstance(class_names, (list, tuple)) or not all(isinstance(c, str) and c.strip() for c in class_names)
            or len(set(class_names)) != len(class_names)):
        raise BloodcellError(f"{where} must be a list of distinct, non-empty names, got {class_names!r}")
    if len(class_names) < k:
        raise BloodcellError(f"{path}: labels go up to {k - 1}, but {where} has only {len(class_names)} names")
    return list(class_names)


def prepare_from_npz(
    path: str | Path, name: str | None = None, size: int | None = None, root: str | Path | None = None,
    corrections: str | Path | None = None, class_names: list[str] | None = None, *, layout: str = "npz",
    shard_images: int | None = None,
) -> dict:
    """Register an official (or any MedMNIST-format) npz as a prepared dataset.

    The class count is the npz's own (largest label + 1): BloodMNIST's names when it is 8, else
    ``class_0..`` (or ``class_names``, or those in a metadata JSON beside the file). ``size`` None takes the
    file's size. The default name is ``bloodmnist`` for 8 classes, else the file's stem. ``layout="shards"``
    stores it as memory-mapped shards (the npz itself is read whole, so it must fit in memory once).
    """
    check_layout(layout, shard_images)
    path = Path(path).expanduser()
    arrays = read_npz(path, every_split=True)
    actual = int(arrays["train_images"].shape[1])
    if size is not None and size != actual:
        raise BloodcellError(f"{path}: images are {actual}x{actual}, but --size {size} was asked for")
    k = num_labels(arrays)
    classes = _npz_class_names(path, k, class_names)
    validate_npz_arrays(arrays, str(path), len(classes), every_split=True)
    name = check_dataset_name(name or ("bloodmnist" if len(classes) == len(BLOODMNIST_CLASSES) else path.stem))
    meta = {
        "name": name,
        "size": actual,
        "class_names": classes,
        "recipe": Recipe(size=actual).to_dict(),
        "source": {"kind": "npz", "path": str(path.resolve())},
        "split_source": {"kind": "npz"},
        "fingerprint": hashlib.sha256(bytes.fromhex(file_sha256(path)) + (_file_hash(corrections) or "").encode()
                                      ).hexdigest(),
        "counts": {s: np.bincount(arrays[f"{s}_labels"].reshape(-1), minlength=len(classes)).tolist()
                   for s in SPLITS},
        "skipped": [],
        "bloodcell_version": __version__,
    }
    arrays, meta = _maybe_correct(arrays, meta, corrections)
    if layout == "shards":
        meta = write_sharded_dataset(name, actual, {s: arrays[f"{s}_images"] for s in SPLITS},
                                     {s: np.asarray(arrays[f"{s}_labels"]).reshape(-1) for s in SPLITS}, meta, root,
                                     shard_images=shard_images)
        return {**meta, "reused": False, **result_paths(name, actual, root, "shards")}
    npz_path, json_path = write_dataset(name, actual, arrays, meta, root)
    return {**meta, "reused": False, "npz": str(npz_path), "json": str(json_path)}


def download_bloodmnist(size: int = 64, root: str | Path | None = None, *, layout: str = "npz") -> dict:
    """Fetch the official BloodMNIST npz through ``medmnist`` (which checks its MD5), then register it."""
    from bloodcell.data.store import data_dir

    if size not in SIZES:
        raise BloodcellError(f"BloodMNIST comes in sizes {', '.join(map(str, SIZES))}, not --size {size}")
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
    return prepare_from_npz(target / fname, name="bloodmnist", size=size, root=root, layout=layout)
