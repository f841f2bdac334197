"""Prepared datasets larger than memory: per split, fixed-size shards of uint8 ``.npy`` files, memory-mapped.

Layout: ``<data_dir>/<name>/<name>_<size>_shards/`` holds ``manifest.json`` (format, size, each split's shard
files and image counts, and the dataset's metadata: class names, source fingerprint, recipe, split, skipped
files), per split the shards ``<split>-<build>-00000.npy``, ... (``shard_images`` x S x S x 3 uint8, the last one
shorter) and ``<split>-<build>-labels.npy``. The ``<name>_<size>.json`` beside it says ``"layout": "shards"``.

Why memory-mapped ``.npy`` shards and not WebDataset-style tar shards: training draws a random permutation and
per-image augmentation codes and cuts batches from it by index. A memory map gives random access by index, so a
run on shards takes exactly the batches, augmentations and results of the in-memory run, and a read is a copy
of raw pixels (no decoding per read, the page cache does the rest). Tar shards can only be read in order, so a
loader must shuffle within a buffer (another order, other results) and decodes every image each epoch; they
suit streaming from an object store to many machines, which is the route for a cluster (convert these shards,
or the image folders, to tar shards there).

Writes: every file is written to a temporary name and renamed (``atomic_write``, which gives the umask's mode);
the manifest is written last and names the new build's files, so a reader sees the old dataset or the new one,
never a mix; files of older builds are removed after. Reads open each shard with ``np.load(mmap_mode="r")``:
nothing is read until rows are indexed, and a truncated or foreign file is a one-line error naming it.
"""

from __future__ import annotations

import secrets
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from bloodcell.choices import LAYOUTS
from bloodcell.data.store import (
    SHARDS_MANIFEST,
    SPLITS,
    PreparedData,
    data_dir,
    dataset_paths,
    shards_folder,
    validate_npz_arrays,
)
from bloodcell.errors import BloodcellError
from bloodcell.io import atomic_write, read_json, write_json

FORMAT = "bloodcell-shards"
VERSION = 1
MANIFEST = SHARDS_MANIFEST
SHARD_BYTES = 64 << 20  # default shard: about 64 MiB of pixels (5461 images at 64 px, 445 at 224 px)
CHUNK_BYTES = 256 << 20  # default chunk of images decoded or copied at a time


def image_bytes(size: int) -> int:
    return size * size * 3


def default_shard_images(size: int) -> int:
    return max(1, SHARD_BYTES // image_bytes(size))


def default_chunk_images(size: int) -> int:
    """A few thousand images: at most 4096, fewer for large images (at least 256)."""
    return int(min(4096, max(256, CHUNK_BYTES // image_bytes(size))))


def check_layout(layout: str, shard_images: int | None = None, chunk_images: int | None = None) -> None:
    """One-line errors for a bad ``--layout``, ``--shard-images`` or ``--chunk-images`` before any file is read."""
    if layout not in LAYOUTS:
        raise BloodcellError(f"--layout must be one of {', '.join(LAYOUTS)}, got {layout!r}")
    for option, value in (("--shard-images", shard_images), ("--chunk-images", chunk_images)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise BloodcellError(f"{option} must be a whole number >= 1, got {value!r}")


# ------------------------------------------------------------------ reading
class ShardedArray:
    """One split's images, N x S x S x 3 uint8, over memory-mapped shards; rows are read only when indexed.

    ``take(indices)`` reads just those rows (sorted first, so each shard is read front to back, then put back in
    the order asked). Indexing with an int, a slice, an index array or a boolean mask returns a NumPy array;
    ``np.asarray`` reads the whole split (for code that needs it in memory). ``select`` is a lazy subset.
    """

    dtype = np.dtype(np.uint8)
    ndim = 4

    def __init__(self, shards: list[np.ndarray], files: list[Path], rows: np.ndarray | None = None):
        self.shards, self.files, self.rows = shards, files, rows
        self.starts = np.cumsum([0, *(len(s) for s in shards)])
        n = int(self.starts[-1]) if rows is None else len(rows)
        self.shape = (n, *shards[0].shape[1:])

    def __len__(self) -> int:
        return self.shape[0]

    def __repr__(self) -> str:
        return f"ShardedArray(shape={self.shape}, shards={len(self.shards)})"

    def positions(self, indices) -> np.ndarray:
        """``indices`` (ints, negatives from the end, or a boolean mask) as positions in the shards."""
        idx = np.asarray(indices)
        if idx.dtype == bool:
            if idx.shape != (len(self),):
                raise IndexError(f"boolean index of shape {idx.shape} for {len(self)} images")
            idx = np.flatnonzero(idx)
        if idx.size and not np.issubdtype(idx.dtype, np.integer):
            raise IndexError(f"images are indexed by integers, not {idx.dtype}")
        idx = idx.astype(np.int64, copy=False).reshape(-1)
        n = len(self)
        if idx.size and (idx.min() < -n or idx.max() >= n):
            raise IndexError(f"index out of range for {n} images")
        idx = np.where(idx < 0, idx + n, idx)
        return idx if self.rows is None else self.rows[idx]

    def select(self, indices) -> ShardedArray:
        """A lazy subset (nothing read): the images at ``indices``, in that order."""
        return ShardedArray(self.shards, self.files, self.positions(indices))

    def take(self, indices) -> np.ndarray:
        """The images at ``indices`` as one NxSxSx3 array, in the order given."""
        rows = self.positions(indices)
        out = np.empty((len(rows), *self.shape[1:]), dtype=np.uint8)
        if not len(rows):
            return out
        order = np.argsort(rows, kind="stable")
        ordered = rows[order]
        shard_of = np.searchsorted(self.starts, ordered, side="right") - 1
        cuts = np.flatnonzero(np.diff(shard_of)) + 1
        for where, wanted, k in zip(np.split(order, cuts), np.split(ordered, cuts), shard_of[np.r_[0, cuts]]):
            out[where] = self._rows_of_shard(int(k), wanted - self.starts[k])
        return out

    def _rows_of_shard(self, k: int, local: np.ndarray) -> np.ndarray:
        """Sorted rows of shard ``k``: a slice when they are consecutive (a plain copy), else a gather."""
        if len(local) == 1 or (np.diff(local) == 1).all():
            return self.shards[k][local[0] : local[-1] + 1]
        return self.shards[k][local]

    def __getitem__(self, key):
        if isinstance(key, (int, np.integer)):
            return self.take([key])[0]
        if isinstance(key, slice):
            return self.take(np.arange(*key.indices(len(self))))
        return self.take(key)

    def __iter__(self) -> Iterator[np.ndarray]:
        for _, chunk in self.chunks(default_chunk_images(self.shape[1])):
            yield from chunk

    def chunks(self, size: int) -> Iterator[tuple[int, np.ndarray]]:
        """(start, images) over the split, ``size`` images at a time."""
        for i in range(0, len(self), size):
            yield i, self[i : i + size]

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        out = self.take(np.arange(len(self)))
        return out if dtype is None else out.astype(dtype)


def open_shard(path: Path, images: int, size: int) -> np.ndarray:
    """A memory map of one shard, checked against the manifest; a bad file is a one-line error naming it."""
    if not path.is_file():
        raise BloodcellError(f"{path}: shard file missing (the shards are incomplete; prepare the dataset again)")
    try:
        arr = np.load(path, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError, EOFError) as e:
        raise BloodcellError(f"{path}: not a readable .npy shard ({_first_line(e)}); the file is truncated or "
                             f"corrupt, prepare the dataset again with --force") from None
    want = (images, size, size, 3)
    if not isinstance(arr, np.ndarray) or arr.dtype != np.uint8 or arr.shape != want:
        got = f"{arr.dtype} {arr.shape}" if isinstance(arr, np.ndarray) else type(arr).__name__
        raise BloodcellError(f"{path}: shard holds {got}, the manifest says uint8 {want}; "
                             f"prepare the dataset again with --force")
    return arr


def read_labels(path: Path, count: int) -> np.ndarray:
    if not path.is_file():
        raise BloodcellError(f"{path}: labels file missing (the shards are incomplete; prepare the dataset again)")
    try:
        y = np.load(path, allow_pickle=False)
    except (ValueError, OSError, EOFError) as e:
        raise BloodcellError(f"{path}: not a readable .npy labels file ({_first_line(e)}); prepare the dataset "
                             f"again with --force") from None
    if not isinstance(y, np.ndarray) or not np.issubdtype(y.dtype, np.integer) or y.shape != (count,):
        got = f"{y.dtype} {y.shape}" if isinstance(y, np.ndarray) else type(y).__name__
        raise BloodcellError(f"{path}: labels are {got}, the manifest says {count} integers; "
                             f"prepare the dataset again with --force")
    return y.astype(np.int64)


def _first_line(e: Exception) -> str:
    lines = str(e).strip().splitlines()
    return lines[0] if lines else type(e).__name__


def read_manifest(folder: Path) -> dict:
    """The checked manifest of a shards folder (format, version, size, splits)."""
    path = folder / MANIFEST
    if not path.is_file():
        raise BloodcellError(f"{folder}: not a prepared shards folder ({MANIFEST} missing)")
    m = read_json(path)
    if not isinstance(m, dict) or m.get("format") != FORMAT:
        raise BloodcellError(f"{path}: not a bloodcell shards manifest (format {FORMAT!r} expected)")
    if m.get("version") != VERSION:
        raise BloodcellError(f"{path}: shards format version {m.get('version')!r}; this bloodcell reads {VERSION}")
    splits, size = m.get("splits"), m.get("size")
    if not isinstance(size, int) or not isinstance(splits, dict) or set(SPLITS) - set(splits) \
            or not isinstance(m.get("meta"), dict):
        raise BloodcellError(f"{path}: incomplete manifest (needs size, meta and splits {', '.join(SPLITS)})")
    for s in SPLITS:
        entry = splits[s]
        if not isinstance(entry, dict) or not isinstance(entry.get("shards"), list) or not entry["shards"] \
                or not isinstance(entry.get("labels"), str) \
                or not all(isinstance(x, dict) and isinstance(x.get("file"), str) and isinstance(x.get("images"), int)
                           for x in entry["shards"]):
            raise BloodcellError(f"{path}: the {s} split's entry is malformed")
    return m


def load_shards(folder: str | Path) -> PreparedData:
    """A shards folder as a PreparedData whose images are ``ShardedArray``s (labels in memory)."""
    folder = Path(folder).expanduser()
    m = read_manifest(folder)
    size, meta = m["size"], dict(m["meta"])
    images, labels = {}, {}
    for s in SPLITS:
        entry = m["splits"][s]
        files = [_inside(folder, x["file"]) for x in entry["shards"]]
        shards = [open_shard(f, x["images"], size) for f, x in zip(files, entry["shards"])]
        images[s] = ShardedArray(shards, files)
        labels[s] = read_labels(_inside(folder, entry["labels"]), len(images[s]))
    classes = meta.get("class_names")
    if not isinstance(classes, list) or not classes or not all(isinstance(c, str) for c in classes):
        raise BloodcellError(f"{folder / MANIFEST}: meta.class_names must be a list of names")
    validate_npz_arrays(proxy_arrays(images, labels, size), str(folder), len(classes))
    return PreparedData(images, labels, list(classes), meta, folder)


def _inside(folder: Path, name: str) -> Path:
    """A file the manifest names: a plain name inside the folder (never a path out of it)."""
    if not name or Path(name).name != name or name.startswith("."):
        raise BloodcellError(f"{folder / MANIFEST}: file name {name!r} is not a plain name inside the folder")
    return folder / name


def proxy_arrays(images: dict, labels: dict, size: int) -> dict[str, np.ndarray]:
    """MedMNIST-format arrays for ``validate_npz_arrays`` without reading pixels: each split's images as a
    zero-byte broadcast view of the right shape and dtype, and its labels."""
    out = {}
    for s in SPLITS:
        blank = np.zeros((1, size, size, 3), dtype=np.uint8)
        out[f"{s}_images"] = np.broadcast_to(blank, (len(images[s]), size, size, 3))
        out[f"{s}_labels"] = np.asarray(labels[s])
    return out


# ------------------------------------------------------------------ writing
class ShardWriter:
    """Appends images to one split's shards; a shard file is written each time ``shard_images`` are buffered, so
    memory holds at most one shard."""

    def __init__(self, folder: Path, prefix: str, size: int, shard_images: int):
        self.folder, self.prefix, self.size = folder, prefix, size
        self.buffer = np.empty((shard_images, size, size, 3), dtype=np.uint8)
        self.filled = 0
        self.entries: list[dict] = []

    def append(self, images: np.ndarray) -> None:
        images = np.asarray(images)
        if images.dtype != np.uint8 or images.shape[1:] != (self.size, self.size, 3):
            raise BloodcellError(f"shards take uint8 N x {self.size} x {self.size} x 3 images, got "
                                 f"{images.dtype} {images.shape}")
        cap = len(self.buffer)
        i = 0
        while i < len(images):
            take = min(cap - self.filled, len(images) - i)
            self.buffer[self.filled : self.filled + take] = images[i : i + take]
            self.filled += take
            i += take
            if self.filled == cap:
                self.flush()

    def flush(self) -> None:
        if not self.filled:
            return
        name = f"{self.prefix}-{len(self.entries):05d}.npy"
        save_npy(self.folder / name, self.buffer[: self.filled])
        self.entries.append({"file": name, "images": self.filled})
        self.filled = 0

    def close(self) -> list[dict]:
        """Write the last (shorter) shard; the shard entries for the manifest."""
        self.flush()
        return self.entries


def save_npy(path: Path, array: np.ndarray) -> None:
    """One ``.npy`` file, atomically (temporary file, then rename; mode from the umask)."""

    def _write(tmp: str) -> None:
        with open(tmp, "wb") as f:
            np.save(f, array, allow_pickle=False)

    atomic_write(path, _write)


def write_split(folder: Path, prefix: str, images, size: int, shard_images: int, chunk: int) -> list[dict]:
    """Copy ``images`` (anything with ``len`` that indexes by a position array: a NumPy array, a ShardedArray)
    into shards, ``chunk`` images at a time."""
    writer = ShardWriter(folder, prefix, size, shard_images)
    for i in range(0, len(images), chunk):
        writer.append(images[np.arange(i, min(i + chunk, len(images)))])
    return writer.close()


def write_shards(folder: str | Path, images: dict, labels: dict[str, np.ndarray], meta: dict, *,
                 shard_images: int | None = None, chunk_images: int | None = None) -> Path:
    """Write a whole dataset (every split's images and labels, and ``meta``) as shards into ``folder``.

    ``images[split]`` may be lazy (read ``chunk_images`` at a time), so memory holds a chunk and a shard, not
    the dataset. Checked like an npz first (labels, classes in every split) without reading pixels."""
    folder = Path(folder)
    size = int(meta["size"])
    classes = meta["class_names"]
    check_layout("shards", shard_images, chunk_images)
    shard_images = shard_images or default_shard_images(size)
    chunk = chunk_images or default_chunk_images(size)
    validate_npz_arrays(proxy_arrays(images, labels, size), str(folder), len(classes), every_split=True)
    label_dtype = np.uint8 if len(classes) <= 256 else np.int64  # as in the npz: MedMNIST's uint8 unless too many
    folder.mkdir(parents=True, exist_ok=True)
    build = secrets.token_hex(4)
    splits = {}
    for s in SPLITS:
        shards = write_split(folder, f"{s}-{build}", images[s], size, shard_images, chunk)
        label_file = f"{s}-{build}-labels.npy"
        save_npy(folder / label_file, np.asarray(labels[s]).reshape(-1).astype(label_dtype))
        splits[s] = {"images": len(images[s]), "labels": label_file, "shards": shards}
    manifest = {"format": FORMAT, "version": VERSION, "size": size, "shard_images": shard_images, "build": build,
                "fingerprint": meta.get("fingerprint"), "splits": splits, "meta": meta}
    write_json(folder / MANIFEST, manifest)  # the switch to the new build: one rename
    remove_other_builds(folder, build)
    return folder


def remove_other_builds(folder: Path, build: str) -> None:
    """Delete shard and label files of earlier (or interrupted) builds; the manifest names only ``build``'s."""
    for p in folder.iterdir():
        stale = p.suffix == ".npy" and f"-{build}-" not in p.name
        leftover = p.name.startswith(".") and p.name.endswith(".tmp")
        if p.is_file() and (stale or leftover):
            p.unlink(missing_ok=True)


def shards_meta(meta: dict, name: str, size: int, shard_images: int | None) -> dict:
    """``meta`` saying the dataset is stored as shards (and where)."""
    return {**meta, "layout": "shards",
            "shards": {"folder": f"{name}_{size}_shards", "shard_images": shard_images or default_shard_images(size)}}


def npz_meta(meta: dict) -> dict:
    """``meta`` of the default in-memory layout (no layout keys, as before shards existed)."""
    return {k: v for k, v in meta.items() if k not in ("layout", "shards")}


def write_sharded_dataset(name: str, size: int, images: dict, labels: dict[str, np.ndarray], meta: dict,
                          root: str | Path | None = None, *, shard_images: int | None = None,
                          chunk_images: int | None = None) -> dict:
    """The shards layout of ``write_dataset``: shards + manifest, then the dataset's JSON; returns the metadata
    written (with ``layout`` and ``shards``).

    An npz beside it that held other inputs (another fingerprint) is removed: the JSON now describes the shards,
    and a later ``prepare`` in the npz layout must not take that stale npz for an up-to-date one."""
    folder = shards_folder(name, size, root)
    npz_path, json_path = dataset_paths(name, size, root)
    before = _fingerprint_of(json_path)
    meta = shards_meta(meta, name, size, shard_images)
    write_shards(folder, images, labels, meta, shard_images=shard_images, chunk_images=chunk_images)
    write_json(json_path, meta)
    if npz_path.is_file() and before != meta.get("fingerprint"):
        npz_path.unlink(missing_ok=True)
    return meta


def _fingerprint_of(json_path: Path) -> str | None:
    try:
        old = read_json(json_path) if json_path.is_file() else None
    except BloodcellError:
        return None
    return old.get("fingerprint") if isinstance(old, dict) else None


@contextmanager
def staging_folder(name: str, size: int, root: str | Path | None = None) -> Iterator[Path]:
    """A temporary folder beside the dataset (same file system) for images decoded before the split is known;
    removed afterwards, also when the import fails."""
    parent = data_dir(root) / name
    parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}_{size}_staging.", dir=parent))
    try:
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def open_staged(folder: Path, entries: list[dict], size: int) -> ShardedArray | None:
    """The staged images (in file order) as one lazy array; None when there are none."""
    if not entries:
        return None
    files = [folder / e["file"] for e in entries]
    return ShardedArray([open_shard(f, e["images"], size) for f, e in zip(files, entries)], files)


def reusable(name: str, size: int, root: str | Path | None, fingerprint: str, layout: str) -> dict | None:
    """The prepared dataset's metadata when it was made from the same inputs and exists in ``layout``; the
    JSON is switched to ``layout`` if it named the other one (both hold the same images). None otherwise."""
    npz_path, json_path = dataset_paths(name, size, root)
    if not json_path.is_file():
        return None
    try:
        old = read_json(json_path)
    except BloodcellError:
        return None
    if not isinstance(old, dict) or old.get("fingerprint") != fingerprint:
        return None
    folder = shards_folder(name, size, root)
    if layout == "shards":
        try:
            m = read_manifest(folder)
        except BloodcellError:
            return None
        if m.get("fingerprint") != fingerprint:
            return None
        meta = m["meta"]
    elif npz_path.is_file():
        meta = npz_meta(old)
    else:
        return None
    if old.get("layout", "npz") != layout:
        write_json(json_path, meta)
    return {**meta, "reused": True, **result_paths(name, size, root, layout)}


def result_paths(name: str, size: int, root: str | Path | None, layout: str) -> dict:
    """Where ``prepare`` put the dataset: ``npz`` (or ``shards_path``) and ``json``, as text."""
    npz_path, json_path = dataset_paths(name, size, root)
    where = {"shards_path": str(shards_folder(name, size, root))} if layout == "shards" else {"npz": str(npz_path)}
    return {**where, "json": str(json_path)}
