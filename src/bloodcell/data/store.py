"""Prepared datasets: MedMNIST-format ``.npz`` files plus a JSON of metadata, in one cache folder.

Layout: ``<data_dir>/<name>/<name>_<size>.npz`` and ``<name>_<size>.json``. The npz has the MedMNIST
keys (``train_images`` uint8 NxHxWx3, ``train_labels`` Nx1, and the same for val and test), so files
from the official BloodMNIST release and ours are interchangeable. A dataset larger than memory is stored
instead as memory-mapped shards (``<name>_<size>_shards/``, see ``bloodcell.data.shards``); its JSON then says
``"layout": "shards"`` and ``load_dataset`` returns its splits as lazy arrays.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from platformdirs import user_cache_dir

from bloodcell.choices import SIZES, SPLITS  # noqa: F401 - re-exported: data code imports them from here
from bloodcell.errors import BloodcellError
from bloodcell.io import atomic_write, read_json, write_json

BLOODMNIST_CLASSES = [
    "basophil", "eosinophil", "erythroblast", "ig", "lymphocyte", "monocyte", "neutrophil", "platelet",
]
NPZ_KEYS = tuple(f"{s}_{k}" for s in SPLITS for k in ("images", "labels"))


def default_class_names(k: int) -> list[str]:
    """BloodMNIST's names for an 8-class dataset without names; ``class_0..class_{k-1}`` for any other count."""
    return list(BLOODMNIST_CLASSES) if k == len(BLOODMNIST_CLASSES) else [f"class_{i}" for i in range(k)]


def require_two_classes(labels: dict[str, np.ndarray], where: str, class_names: list[str] | None = None) -> None:
    """Every split needs at least 2 classes: training learns nothing from one, and on a one-class val/test
    split per-class metrics and AUC are undefined."""
    for s in SPLITS:
        if s not in labels:
            continue
        present = np.unique(np.asarray(labels[s]).reshape(-1))
        if len(present) < 2:
            named = ", ".join(class_names[i] if class_names and 0 <= i < len(class_names) else f"label {i}"
                              for i in present.tolist()) or "none"
            why = ("a classifier needs at least 2 classes to learn" if s == "train" else
                   "accuracy per class, F1 and AUC are undefined on a split with one class")
            raise BloodcellError(f"{where}: need at least 2 classes in every split, but the {s} split has "
                                 f"{len(present)} ({named}): {why}")


def data_dir(override: str | Path | None = None) -> Path:
    """Where prepared datasets live: ``--data-dir``, else ``$BLOODCELL_DATA_DIR``, else the user cache."""
    if override:
        return Path(override).expanduser()
    env = os.environ.get("BLOODCELL_DATA_DIR")
    if env:
        return Path(env).expanduser()
    return Path(user_cache_dir("bloodcell")) / "datasets"


def check_dataset_name(name: str) -> str:
    """A dataset name is one folder name in the cache: a path (``../x``, ``a/b``) would write outside it."""
    if not isinstance(name, str) or not name.strip() or name.startswith(".") or any(c in name for c in "/\\\0"):
        raise BloodcellError(f"dataset name {name!r} must be a plain name (no '/' or '\\', not starting with '.'); "
                             f"to use a file, give a path ending in .npz (or the path of a shards folder)")
    return name


def dataset_paths(name: str, size: int, root: str | Path | None = None) -> tuple[Path, Path]:
    folder = data_dir(root) / check_dataset_name(name)
    return folder / f"{name}_{size}.npz", folder / f"{name}_{size}.json"


SHARDS_MANIFEST = "manifest.json"


def shards_folder(name: str, size: int, root: str | Path | None = None) -> Path:
    """Where the shards layout of dataset ``name`` at ``size`` px lives (beside its npz and JSON)."""
    return dataset_paths(name, size, root)[0].with_name(f"{name}_{size}_shards")


@dataclass
class PreparedData:
    """A dataset as uint8 images (NxHxWx3) and int64 labels (N,) per split. The images are NumPy arrays in
    memory, or, for the shards layout, ``ShardedArray``s that read rows from disk only when indexed."""

    images: dict[str, np.ndarray]
    labels: dict[str, np.ndarray]
    class_names: list[str]
    meta: dict = field(default_factory=dict)
    path: Path | None = None

    @property
    def size(self) -> int:
        return int(self.images["train"].shape[1])

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def counts(self) -> dict[str, list[int]]:
        k = self.num_classes
        return {s: np.bincount(self.labels[s], minlength=k).tolist() for s in SPLITS}


def validate_npz_arrays(arrays: dict[str, np.ndarray], where: str, num_classes: int | None = None,
                        every_split: bool = False) -> None:
    """Check keys, dtypes, shapes, label range and class coverage of MedMNIST-format arrays; one-line errors.

    The train split always needs 2 classes. ``every_split`` (used when a dataset is prepared) also requires
    2 classes in val and test and no val/test class that train lacks; loading an existing npz does not, so
    such a file can still be evaluated (its metrics then say which scores are undefined).
    """
    missing = [k for k in NPZ_KEYS if k not in arrays]
    if missing:
        raise BloodcellError(
            f"{where}: not a MedMNIST-format npz, missing key(s) {', '.join(missing)} "
            f"(found: {', '.join(sorted(arrays)) or 'none'})"
        )
    size = None
    for s in SPLITS:
        x, y = arrays[f"{s}_images"], arrays[f"{s}_labels"]
        for key, a in ((f"{s}_images", x), (f"{s}_labels", y)):
            if not isinstance(a, np.ndarray):
                raise BloodcellError(f"{where}: {key} is not a numpy array")
        if x.dtype != np.uint8:
            hint = " (scale 0..1 floats with (x * 255).round().astype(np.uint8))" if x.dtype.kind == "f" else ""
            raise BloodcellError(f"{where}: {s}_images has dtype {x.dtype}, expected uint8{hint}")
        if x.ndim != 4 or x.shape[3] != 3 or x.shape[1] != x.shape[2] or x.shape[1] < 1:
            raise BloodcellError(f"{where}: {s}_images has shape {x.shape}, expected N x S x S x 3 (RGB)")
        if size is None:
            size = x.shape[1]
        elif x.shape[1] != size:
            raise BloodcellError(f"{where}: {s}_images are {x.shape[1]}px but train_images are {size}px")
        if not np.issubdtype(y.dtype, np.integer):
            raise BloodcellError(f"{where}: {s}_labels has dtype {y.dtype}, expected integers")
        if not (y.ndim == 1 or (y.ndim == 2 and y.shape[1] == 1)):
            raise BloodcellError(f"{where}: {s}_labels has shape {y.shape}, expected N x 1 (one label per image)")
        if len(y) != len(x):
            raise BloodcellError(f"{where}: {s} has {len(x)} images but {len(y)} labels")
        if len(x) == 0:
            raise BloodcellError(f"{where}: the {s} split is empty")
        top = num_classes - 1 if num_classes is not None else None
        if y.min() < 0 or (top is not None and y.max() > top):
            expected = f"0..{top}" if top is not None else "0 or more"
            raise BloodcellError(f"{where}: {s}_labels range {int(y.min())}..{int(y.max())}, expected {expected}")
    require_two_classes({s: arrays[f"{s}_labels"] for s in (SPLITS if every_split else ("train",))}, where)
    if not every_split:
        return
    trained = set(np.unique(arrays["train_labels"]).tolist())
    for s in ("val", "test"):
        unseen = sorted(set(np.unique(arrays[f"{s}_labels"]).tolist()) - trained)
        if unseen:
            shown = ", ".join(map(str, unseen[:8])) + (f" and {len(unseen) - 8} more" if len(unseen) > 8 else "")
            raise BloodcellError(f"{where}: {s}_labels has label(s) {shown} that train_labels never has "
                                 f"(a model cannot learn a class it is never shown)")


def _not_npz_reason(head: bytes) -> str | None:
    """Why a file is not an npz (a zip of .npy arrays), judged from its first bytes; None if it may be one."""
    if head.startswith((b"PK\x03\x04", b"PK\x05\x06")):
        return None
    if not head:
        return "the file is empty"
    if head.startswith(b"\x93NUMPY"):
        return "it is a single .npy array, not a zip of train/val/test arrays"
    if head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05"):
        return "it looks like a Python pickle"
    if head.startswith(b"\x1f\x8b"):
        return "it is gzip-compressed; decompress it first"
    text = head.decode("utf-8", "replace")  # the 64 bytes may end inside a character: allow a few replacements
    if text.count("\ufffd") <= 3 and all(c.isprintable() or c in "\r\n\t\ufffd" for c in text):
        return "it is a text file"
    return "unrecognised binary data"


def read_npz(path: str | Path, num_classes: int | None = None, every_split: bool = False) -> dict[str, np.ndarray]:
    """Read and validate a MedMNIST-format npz (never unpickles)."""
    import zipfile

    path = Path(path)
    if path.is_dir():
        raise BloodcellError(f"{path}: is a folder, expected an npz file")
    if not path.is_file():
        raise BloodcellError(f"{path}: file not found")
    try:
        with open(path, "rb") as f:
            reason = _not_npz_reason(f.read(64))
    except OSError as e:
        raise BloodcellError(f"{path}: cannot read ({e.strerror or e})") from None
    if reason:
        raise BloodcellError(f"{path}: not an npz file ({reason}; expected a MedMNIST-format .npz)")
    key = None
    try:
        with np.load(path, allow_pickle=False) as z:
            arrays = {}
            for key in z.files:
                if key in NPZ_KEYS:
                    arrays[key] = z[key]
            found = list(z.files)
    except ValueError as e:
        if "allow_pickle" in str(e) or "Object arrays" in str(e):
            raise BloodcellError(f"{path}: array '{key}' holds Python objects, not numbers; bloodcell never "
                                 f"unpickles data files (save the arrays with a numeric dtype)") from None
        raise BloodcellError(f"{path}: not a valid npz file ({e})") from None
    except (zipfile.BadZipFile, OSError, EOFError, KeyError) as e:
        raise BloodcellError(f"{path}: not a valid npz file ({type(e).__name__}: {e})") from None
    missing = [k for k in NPZ_KEYS if k not in arrays]
    if missing:
        raise BloodcellError(
            f"{path}: not a MedMNIST-format npz, missing key(s) {', '.join(missing)} "
            f"(found: {', '.join(sorted(found)) or 'none'})"
        )
    validate_npz_arrays(arrays, str(path), num_classes, every_split)
    return arrays


def num_labels(arrays: dict[str, np.ndarray]) -> int:
    """Classes an npz's labels imply: the largest label + 1 over all splits."""
    return max(int(np.asarray(arrays[f"{s}_labels"]).max()) for s in SPLITS) + 1


def write_dataset(
    name: str, size: int, arrays: dict[str, np.ndarray], meta: dict, root: str | Path | None = None
) -> tuple[Path, Path]:
    """Store arrays (labels as Nx1 uint8, MedMNIST style) and metadata atomically; return both paths."""
    npz_path, json_path = dataset_paths(name, size, root)
    # checked before any cast, so float images or out-of-range labels cannot be silently wrapped into uint8
    validate_npz_arrays({k: np.asarray(arrays[k]) for k in NPZ_KEYS if k in arrays}, str(npz_path),
                        len(meta["class_names"]), every_split=True)
    label_dtype = np.uint8 if len(meta["class_names"]) <= 256 else np.int64  # MedMNIST's uint8 unless too many
    out = {}
    for s in SPLITS:
        out[f"{s}_images"] = np.ascontiguousarray(arrays[f"{s}_images"], dtype=np.uint8)
        out[f"{s}_labels"] = np.asarray(arrays[f"{s}_labels"]).reshape(-1, 1).astype(label_dtype)

    def _write(tmp: str) -> None:
        with open(tmp, "wb") as f:
            np.savez(f, **out)

    atomic_write(npz_path, _write)
    write_json(json_path, meta)
    return npz_path, json_path


def load_dataset(data: str | Path, size: int = 64, root: str | Path | None = None) -> PreparedData:
    """Load ``data`` (a prepared dataset's name, a MedMNIST-format npz file, or a shards folder).

    An npz is read fully into memory (the default, for data that fits); a dataset prepared with the shards
    layout comes back with lazy, memory-mapped images (nothing is read until indexed).
    Never downloads: fetching BloodMNIST is the explicit step ``bloodcell data prepare --download``, so a
    training run cannot start a network transfer (or fail on one) by itself.
    """
    data_s = str(data)
    sharded = _shards_to_load(data_s, size, root)
    if sharded is not None:
        from bloodcell.data.shards import load_shards

        return load_shards(sharded)
    if data_s.lower().endswith(".npz"):
        path = Path(data_s).expanduser()
        meta_path = path.with_suffix(".json")
        meta = _read_meta(meta_path) if meta_path.is_file() else {}
        meta.setdefault("name", path.stem)
    else:
        path, meta_path = dataset_paths(data_s, size, root)
        if not path.is_file():
            if data_s == "bloodmnist":
                raise BloodcellError(
                    f"dataset 'bloodmnist' at {size}px is not prepared in {data_dir(root)}; get it with "
                    f"'bloodcell data prepare --download --size {size}' (needs internet), or from a local file "
                    f"with 'bloodcell data prepare --npz FILE', or from the PBC images with "
                    f"'bloodcell data prepare --source DIR --size {size}'"
                )
            known = ", ".join(f"{d['name']} ({d['size']}px)" for d in list_datasets(root)) or "none"
            raise BloodcellError(
                f"dataset '{data_s}' at {size}px not found in {data_dir(root)} (prepared: {known}); "
                f"run 'bloodcell data prepare' first"
            )
        meta = _read_meta(meta_path) if meta_path.is_file() else {"name": data_s}
    arrays = read_npz(path)
    classes = meta.get("class_names") or _default_classes(arrays, path)
    if not isinstance(classes, list) or not all(isinstance(c, str) for c in classes):
        raise BloodcellError(f"{meta_path}: class_names must be a list of names")
    validate_npz_arrays(arrays, str(path), len(classes))
    images = {s: arrays[f"{s}_images"] for s in SPLITS}
    labels = {s: arrays[f"{s}_labels"].reshape(-1).astype(np.int64) for s in SPLITS}
    return PreparedData(images, labels, list(classes), meta, path)


def _shards_to_load(data: str, size: int, root: str | Path | None) -> Path | None:
    """The shards folder ``data`` names: a path to one (names cannot contain a separator), or a prepared
    dataset whose JSON says ``"layout": "shards"`` (or that has shards and no npz). None for the npz layout."""
    if "/" in data or os.sep in data:
        folder = Path(data).expanduser()
        return folder if folder.is_dir() and not data.lower().endswith(".npz") else None
    if data.lower().endswith(".npz"):
        return None
    npz_path, meta_path = dataset_paths(data, size, root)
    folder = shards_folder(data, size, root)
    if not meta_path.is_file():
        return None
    layout = _read_meta(meta_path).get("layout", "npz")
    if layout == "shards" or (not npz_path.is_file() and (folder / SHARDS_MANIFEST).is_file()):
        return folder
    return None


def _read_meta(path: Path) -> dict:
    meta = read_json(path)
    if not isinstance(meta, dict):
        raise BloodcellError(f"{path}: dataset metadata must be a JSON object, found {type(meta).__name__}")
    return meta


def _default_classes(arrays: dict[str, np.ndarray], path: Path) -> list[str]:
    """Names for an npz without metadata: BloodMNIST's only when its labels imply exactly 8 classes."""
    return default_class_names(num_labels(arrays))


def list_datasets(root: str | Path | None = None) -> list[dict]:
    """Every prepared dataset in the cache: name, size, counts, source and path."""
    out = []
    base = data_dir(root)
    if not base.is_dir():
        return out
    for meta_path in sorted(base.glob("*/*.json")):
        try:
            meta = _read_meta(meta_path)
        except BloodcellError:
            continue
        npz_path = meta_path.with_suffix(".npz")
        if meta.get("layout") == "shards":
            npz_path = meta_path.with_name(meta_path.stem + "_shards")  # the folder stands where the npz would
            if not (npz_path / SHARDS_MANIFEST).is_file():
                continue
        elif not npz_path.is_file():
            continue
        counts = meta.get("counts", {})
        out.append({
            "name": meta.get("name", meta_path.parent.name),
            "size": meta.get("recipe", {}).get("size", meta.get("size")),
            "classes": len(meta.get("class_names", [])),
            "train": sum(counts.get("train", [])),
            "val": sum(counts.get("val", [])),
            "test": sum(counts.get("test", [])),
            "source": meta.get("source", {}).get("kind", "?"),
            "path": str(npz_path),
        })
    return out
