"""Prepared datasets: MedMNIST-format ``.npz`` files plus a JSON of metadata, in one cache folder.

Layout: ``<data_dir>/<name>/<name>_<size>.npz`` and ``<name>_<size>.json``. The npz has the MedMNIST
keys (``train_images`` uint8 NxHxWx3, ``train_labels`` Nx1, and the same for val and test), so files
from the official BloodMNIST release and ours are interchangeable.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from platformdirs import user_cache_dir

from bloodcell.errors import BloodcellError
from bloodcell.io import atomic_write, read_json, write_json

SPLITS = ("train", "val", "test")
BLOODMNIST_CLASSES = [
    "basophil", "eosinophil", "erythroblast", "ig", "lymphocyte", "monocyte", "neutrophil", "platelet",
]
SIZES = (28, 64, 128, 224)


def data_dir(override: str | Path | None = None) -> Path:
    """Where prepared datasets live: ``--data-dir``, else ``$BLOODCELL_DATA_DIR``, else the user cache."""
    if override:
        return Path(override).expanduser()
    env = os.environ.get("BLOODCELL_DATA_DIR")
    if env:
        return Path(env).expanduser()
    return Path(user_cache_dir("bloodcell")) / "datasets"


def dataset_paths(name: str, size: int, root: str | Path | None = None) -> tuple[Path, Path]:
    folder = data_dir(root) / name
    return folder / f"{name}_{size}.npz", folder / f"{name}_{size}.json"


@dataclass
class PreparedData:
    """A whole dataset in memory as uint8 arrays (NxHxWx3) and int64 labels (N,)."""

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


def validate_npz_arrays(arrays: dict[str, np.ndarray], where: str, num_classes: int | None = None) -> None:
    """Check keys, dtypes, shapes and label range of MedMNIST-format arrays; raise a one-line error."""
    missing = [f"{s}_{k}" for s in SPLITS for k in ("images", "labels") if f"{s}_{k}" not in arrays]
    if missing:
        raise BloodcellError(
            f"{where}: not a MedMNIST-format npz, missing key(s) {', '.join(missing)} "
            f"(found: {', '.join(sorted(arrays)) or 'none'})"
        )
    size = None
    for s in SPLITS:
        x, y = arrays[f"{s}_images"], arrays[f"{s}_labels"]
        if x.dtype != np.uint8:
            raise BloodcellError(f"{where}: {s}_images has dtype {x.dtype}, expected uint8")
        if x.ndim != 4 or x.shape[3] != 3 or x.shape[1] != x.shape[2]:
            raise BloodcellError(f"{where}: {s}_images has shape {x.shape}, expected N x S x S x 3 (RGB)")
        if size is None:
            size = x.shape[1]
        elif x.shape[1] != size:
            raise BloodcellError(f"{where}: {s}_images are {x.shape[1]}px but train_images are {size}px")
        if not np.issubdtype(y.dtype, np.integer):
            raise BloodcellError(f"{where}: {s}_labels has dtype {y.dtype}, expected integers")
        if not (y.ndim == 1 or (y.ndim == 2 and y.shape[1] == 1)):
            raise BloodcellError(f"{where}: {s}_labels has shape {y.shape}, expected N x 1")
        if len(y) != len(x):
            raise BloodcellError(f"{where}: {s} has {len(x)} images but {len(y)} labels")
        if len(x) == 0:
            raise BloodcellError(f"{where}: the {s} split is empty")
        if num_classes is not None and (y.min() < 0 or y.max() >= num_classes):
            raise BloodcellError(
                f"{where}: {s}_labels range {int(y.min())}..{int(y.max())}, expected 0..{num_classes - 1}"
            )


def read_npz(path: str | Path, num_classes: int | None = None) -> dict[str, np.ndarray]:
    """Read and validate a MedMNIST-format npz (never unpickles)."""
    path = Path(path)
    if not path.is_file():
        raise BloodcellError(f"{path}: file not found")
    try:
        with np.load(path, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
    except Exception as e:  # zipfile.BadZipFile, ValueError (pickled arrays), OSError
        raise BloodcellError(f"{path}: cannot read as an npz file ({type(e).__name__}: {e})") from None
    validate_npz_arrays(arrays, str(path), num_classes)
    return arrays


def write_dataset(
    name: str, size: int, arrays: dict[str, np.ndarray], meta: dict, root: str | Path | None = None
) -> tuple[Path, Path]:
    """Store arrays (labels as Nx1 uint8, MedMNIST style) and metadata atomically; return both paths."""
    npz_path, json_path = dataset_paths(name, size, root)
    out = {}
    for s in SPLITS:
        out[f"{s}_images"] = np.ascontiguousarray(arrays[f"{s}_images"], dtype=np.uint8)
        out[f"{s}_labels"] = np.asarray(arrays[f"{s}_labels"]).reshape(-1, 1).astype(np.uint8)
    validate_npz_arrays(out, str(npz_path), len(meta["class_names"]))

    def _write(tmp: str) -> None:
        with open(tmp, "wb") as f:
            np.savez(f, **out)

    atomic_write(npz_path, _write)
    write_json(json_path, meta)
    return npz_path, json_path


def load_dataset(data: str | Path, size: int = 64, root: str | Path | None = None) -> PreparedData:
    """Load ``data`` (a prepared dataset's name, or a MedMNIST-format npz file) fully into memory.

    The default name ``bloodmnist`` is fetched through the ``medmnist`` package on first use.
    """
    data_s = str(data)
    if data_s.endswith(".npz"):
        path = Path(data_s)
        meta_path = path.with_suffix(".json")
        meta = read_json(meta_path) if meta_path.is_file() else {}
        arrays = read_npz(path)
        classes = meta.get("class_names") or _default_classes(arrays, path)
        validate_npz_arrays(arrays, str(path), len(classes))
        meta.setdefault("name", path.stem)
    else:
        path, meta_path = dataset_paths(data_s, size, root)
        if not path.is_file():
            if data_s == "bloodmnist":
                from bloodcell.data.sources import download_bloodmnist

                download_bloodmnist(size, root)
            else:
                known = ", ".join(f"{d['name']} ({d['size']}px)" for d in list_datasets(root)) or "none"
                raise BloodcellError(
                    f"dataset '{data_s}' at {size}px not found in {data_dir(root)} (prepared: {known}); "
                    f"run 'bloodcell data prepare' first"
                )
        meta = read_json(meta_path) if meta_path.is_file() else {"name": data_s}
        arrays = read_npz(path)
        classes = meta.get("class_names") or _default_classes(arrays, path)
        validate_npz_arrays(arrays, str(path), len(classes))
    images = {s: arrays[f"{s}_images"] for s in SPLITS}
    labels = {s: arrays[f"{s}_labels"].reshape(-1).astype(np.int64) for s in SPLITS}
    return PreparedData(images, labels, list(classes), meta, path)


def _default_classes(arrays: dict[str, np.ndarray], path: Path) -> list[str]:
    top = max(int(arrays[f"{s}_labels"].max()) for s in SPLITS) + 1
    if top <= len(BLOODMNIST_CLASSES):
        return list(BLOODMNIST_CLASSES)
    return [f"class_{i}" for i in range(top)]


def list_datasets(root: str | Path | None = None) -> list[dict]:
    """Every prepared dataset in the cache: name, size, counts, source and path."""
    out = []
    base = data_dir(root)
    if not base.is_dir():
        return out
    for meta_path in sorted(base.glob("*/*.json")):
        npz_path = meta_path.with_suffix(".npz")
        if not npz_path.is_file():
            continue
        try:
            meta = read_json(meta_path)
        except BloodcellError:
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
