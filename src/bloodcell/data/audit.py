"""Data audit: unreadable files, exact and near duplicates within a class, across classes and across splits.

* exact duplicate: the same decoded pixels (SHA-1 of the RGB array and its shape), whatever the file format.
* near duplicate: difference hash (dHash, Krawetz): the image in grayscale resized to (h+1) x h, one bit per
  horizontal neighbour pair (left brighter than right); ``hash_size`` 16 gives 256 bits. Two images are near
  duplicates when their hashes differ in at most ``threshold`` bits (and their pixels differ). dHash ignores
  small changes of brightness, compression and scale, not crops or rotations.
* Pairwise Hamming distances are computed in blocks with numpy (XOR of 64-bit words + a SWAR popcount that
  works on NumPy 1 and 2), so 17,000 images take seconds; memory stays at a few ``block x N`` words.

A pair is "conflicting" if its two images have different labels, "leakage" if they are in different splits.
"""

from __future__ import annotations

import hashlib
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from bloodcell.data.images import ImageDecodeError, load_rgb
from bloodcell.errors import BloodcellError
from bloodcell.io import csv_text, write_json, write_text

HASH_SIZE = 16
THRESHOLD = 10


@dataclass
class AuditItems:
    """What the audit knows of each image: where it is, its label and split, and its two fingerprints."""

    paths: list[str]
    labels: np.ndarray  # class id per image
    splits: list[str | None]
    digests: list[str]  # exact pixel fingerprint
    hashes: np.ndarray  # N x words uint64 dHash bits
    class_names: list[str]
    unreadable: list[dict] = field(default_factory=list)
    hidden: list[dict] = field(default_factory=list)  # hidden files/folders not audited, with the reason


def dhash_bits(image: Image.Image | np.ndarray, hash_size: int = HASH_SIZE) -> np.ndarray:
    """dHash as packed bytes: grayscale (h+1) x h, bit = left pixel brighter than its right neighbour."""
    img = Image.fromarray(image) if isinstance(image, np.ndarray) else image
    small = np.asarray(img.convert("L").resize((hash_size + 1, hash_size), Image.Resampling.BILINEAR),
                       dtype=np.int16)
    return np.packbits((small[:, 1:] < small[:, :-1]).ravel())


def pixel_digest(arr: np.ndarray) -> str:
    return hashlib.sha1(repr(arr.shape).encode() + np.ascontiguousarray(arr).tobytes()).hexdigest()


def as_words(packed: np.ndarray) -> np.ndarray:
    """N x bytes -> N x 64-bit words (zero padded), for fast XOR + popcount."""
    n, b = packed.shape
    pad = (-b) % 8
    if pad:
        packed = np.concatenate([packed, np.zeros((n, pad), np.uint8)], axis=1)
    return np.ascontiguousarray(packed).view(np.uint64)


_M1, _M2, _M4, _H01 = (np.uint64(0x5555555555555555), np.uint64(0x3333333333333333),
                       np.uint64(0x0F0F0F0F0F0F0F0F), np.uint64(0x0101010101010101))


def popcount64(x: np.ndarray) -> np.ndarray:
    """Set bits per element of a uint64 array (the SWAR bit count; ``np.bitwise_count`` needs NumPy 2)."""
    x = x - ((x >> np.uint64(1)) & _M1)
    x = (x & _M2) + ((x >> np.uint64(2)) & _M2)
    x = (x + (x >> np.uint64(4))) & _M4
    return (x * _H01) >> np.uint64(56)  # wraps modulo 2**64 by design: the top byte is the sum


def hamming_pairs(words: np.ndarray, threshold: int, block: int = 256) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """All pairs i < j with Hamming distance <= threshold: (i, j, distance), computed block by block."""
    n = len(words)
    out_i, out_j, out_d = [], [], []
    for a in range(0, n, block):
        rows = words[a : a + block]
        dist = np.zeros((len(rows), n - a), dtype=np.int32)
        for w in range(words.shape[1]):  # one word at a time keeps the temporaries at block x N
            dist += popcount64(rows[:, None, w] ^ words[None, a:, w]).astype(np.int32)
        ii, jj = np.nonzero(dist <= threshold)
        ii, jj = ii + a, jj + a
        keep = jj > ii
        out_i.append(ii[keep])
        out_j.append(jj[keep])
        out_d.append(dist[ii[keep] - a, jj[keep] - a])
    return _cat(out_i, np.int64), _cat(out_j, np.int64), _cat(out_d, np.int32)


def _cat(parts: list[np.ndarray], dtype) -> np.ndarray:
    return np.concatenate(parts).astype(dtype) if parts else np.zeros(0, dtype)


def distance_histogram(words: np.ndarray, up_to: int, block: int = 256) -> list[int]:
    """Number of pairs at each Hamming distance 0..up_to (to choose a threshold)."""
    i, j, d = hamming_pairs(words, up_to, block)
    return np.bincount(d, minlength=up_to + 1)[: up_to + 1].tolist()


# ---------------------------------------------------------------- collecting images
def _fingerprint_file(args: tuple[str, int]) -> tuple[str | None, np.ndarray | None, str | None]:
    path, hash_size = args
    try:
        img = load_rgb(path)
    except ImageDecodeError as e:
        return None, None, str(e)
    return pixel_digest(np.asarray(img)), dhash_bits(img, hash_size), None


def items_from_folder(source: str | Path, split_file: str | Path | None = None, hash_size: int = HASH_SIZE,
                      workers: int = 1) -> AuditItems:
    """Decode every file of a folder-per-class tree (full resolution) and fingerprint it.

    Without a split file, hidden files and folders in the class folders are not audited and are listed in
    ``hidden``; with one, the split file says which files are audited.
    """
    from bloodcell.data.images import get_max_pixels, set_max_pixels
    from bloodcell.data.sources import check_workers, class_names_from_split, read_split_file, scan_class_folders

    check_workers(workers)
    source = Path(source).expanduser()
    hidden: list[dict] = []
    classes, items = scan_class_folders(source, hidden)
    if split_file:
        rows = read_split_file(Path(split_file).expanduser(), source, classes)
        classes = class_names_from_split(rows, Path(split_file))
        rel, labels, splits = [r[0] for r in rows], [r[1] for r in rows], [r[2] for r in rows]
        hidden = []
    else:
        rel, labels, splits = [p for p, _ in items], [c for _, c in items], [None] * len(items)
    jobs = [(str(source / p), hash_size) for p in rel]
    if workers > 1:
        with ProcessPoolExecutor(workers, initializer=set_max_pixels, initargs=(get_max_pixels(),)) as pool:
            results = list(pool.map(_fingerprint_file, jobs, chunksize=64))
    else:
        results = [_fingerprint_file(j) for j in jobs]
    out = _collect(rel, labels, splits, results, classes, hash_size)
    out.hidden = hidden
    return out


def _collect(paths, labels, splits, results, classes, hash_size) -> AuditItems:
    ok = [k for k, r in enumerate(results) if r[2] is None]
    unreadable = [{"path": paths[k], "reason": results[k][2]} for k, r in enumerate(results) if r[2] is not None]
    nbytes = (hash_size * hash_size + 7) // 8
    packed = np.stack([results[k][1] for k in ok]) if ok else np.zeros((0, nbytes), np.uint8)
    return AuditItems([paths[k] for k in ok], np.asarray([labels[k] for k in ok], dtype=np.int64),
                      [splits[k] for k in ok], [results[k][0] for k in ok], as_words(packed), classes, unreadable)


def items_from_dataset(data, hash_size: int = HASH_SIZE) -> AuditItems:
    """Fingerprint a prepared dataset's images (at its prepared size), all splits."""
    from bloodcell.data.store import SPLITS

    paths, labels, splits, results = [], [], [], []
    for s in SPLITS:
        known = (data.meta.get("paths") or {}).get(s)
        for i, (img, y) in enumerate(zip(data.images[s], data.labels[s])):
            paths.append(known[i] if known and len(known) == len(data.labels[s]) else f"{s}#{i}")
            labels.append(int(y))
            splits.append(s)
            results.append((pixel_digest(img), dhash_bits(img, hash_size), None))
    return _collect(paths, labels, splits, results, data.class_names, hash_size)


# ---------------------------------------------------------------- finding duplicates
def exact_pairs(digests: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """All pairs i < j of images with identical pixels."""
    groups: dict[str, list[int]] = {}
    for k, d in enumerate(digests):
        groups.setdefault(d, []).append(k)
    pairs = [(g[a], g[b]) for g in groups.values() if len(g) > 1 for a in range(len(g)) for b in range(a + 1, len(g))]
    arr = np.asarray(pairs, dtype=np.int64).reshape(-1, 2)
    return arr[:, 0], arr[:, 1]


def find_duplicates(items: AuditItems, threshold: int = THRESHOLD) -> list[dict]:
    """Exact and near-duplicate pairs with their labels and splits, exact first, then by distance."""
    ei, ej = exact_pairs(items.digests)
    ni, nj, nd = hamming_pairs(items.hashes, threshold)
    exact_set = set(zip(ei.tolist(), ej.tolist()))
    rows = [_pair_row(items, i, j, "exact", 0) for i, j in zip(ei.tolist(), ej.tolist())]
    rows += [_pair_row(items, i, j, "near", int(d)) for i, j, d in zip(ni.tolist(), nj.tolist(), nd.tolist())
             if (i, j) not in exact_set]
    return sorted(rows, key=lambda r: (r["kind"] != "exact", r["distance"], r["path_a"], r["path_b"]))


def _pair_row(items: AuditItems, i: int, j: int, kind: str, dist: int) -> dict:
    ca, cb = items.class_names[items.labels[i]], items.class_names[items.labels[j]]
    sa, sb = items.splits[i], items.splits[j]
    return {"kind": kind, "distance": dist, "path_a": items.paths[i], "class_a": ca, "split_a": sa or "",
            "path_b": items.paths[j], "class_b": cb, "split_b": sb or "",
            "conflicting_labels": int(ca != cb), "across_splits": int(sa is not None and sa != sb)}


def summarise(rows: list[dict], items: AuditItems, threshold: int, hash_size: int) -> dict:
    def count(kind: str, cond) -> int:
        return sum(1 for r in rows if r["kind"] == kind and cond(r))

    out = {"images_read": len(items.paths), "unreadable": len(items.unreadable), "hidden": len(items.hidden),
           "hidden_paths": [h["path"] for h in items.hidden],
           "hash": f"dHash {hash_size}x{hash_size}", "threshold_bits": threshold}
    for kind in ("exact", "near"):
        out[kind] = {"pairs": count(kind, lambda r: True),
                     "within_class": count(kind, lambda r: not r["conflicting_labels"]),
                     "conflicting_labels": count(kind, lambda r: r["conflicting_labels"]),
                     "across_splits": count(kind, lambda r: r["across_splits"]),
                     "images_involved": len({p for r in rows if r["kind"] == kind for p in (r["path_a"], r["path_b"])})}
    out["distance_histogram"] = distance_histogram(items.hashes, 2 * threshold)
    return out


# ---------------------------------------------------------------- reports
PAIR_FIELDS = ["kind", "distance", "path_a", "class_a", "split_a", "path_b", "class_b", "split_b",
               "conflicting_labels", "across_splits"]


def pairs_csv(rows: list[dict]) -> str:
    return csv_text(PAIR_FIELDS, rows)


def unreadable_csv(unreadable: list[dict]) -> str:
    return csv_text(["path", "reason"], unreadable)


def summary_text(s: dict, show_hidden: int = 20) -> str:
    hidden = s.get("hidden_paths", [])
    lines = [f"{s['images_read']} images read, {s['unreadable']} unreadable, {len(hidden)} hidden skipped; "
             f"near = {s['hash']} within {s['threshold_bits']} bits"]
    lines += [f"  hidden (name starts with '.'), not audited: {p}" for p in hidden[:show_hidden]]
    if len(hidden) > show_hidden:
        lines.append(f"  ... and {len(hidden) - show_hidden} more hidden (all in audit.json)")
    lines += [
             f"{'':<6}{'pairs':>8}{'within class':>14}{'conflicting':>13}{'across splits':>15}{'images':>8}"]
    for kind in ("exact", "near"):
        k = s[kind]
        lines.append(f"{kind:<6}{k['pairs']:>8}{k['within_class']:>14}{k['conflicting_labels']:>13}"
                     f"{k['across_splits']:>15}{k['images_involved']:>8}")
    lines.append("pairs per Hamming distance 0..: " + " ".join(map(str, s["distance_histogram"])))
    return "\n".join(lines)


def audit_markdown(s: dict, rows: list[dict], unreadable: list[dict], what: str, show: int = 50) -> str:
    md = [f"# Data audit: {what}", "", "```", summary_text(s, show_hidden=0), "```", ""]
    if unreadable:
        md += ["## Unreadable files", "", "| path | reason |", "|---|---|"]
        md += [f"| {u['path']} | {u['reason']} |" for u in unreadable] + [""]
    if s.get("hidden_paths"):
        md += ["## Hidden files (name starts with '.'), not audited", ""]
        md += [f"- {p}" for p in s["hidden_paths"]] + [""]
    if rows:
        md += [f"## Duplicate pairs (first {min(show, len(rows))} of {len(rows)}; all in audit_pairs.csv)", "",
               "| kind | bits | a | class a | split a | b | class b | split b |", "|---|---|---|---|---|---|---|---|"]
        md += [f"| {r['kind']} | {r['distance']} | {r['path_a']} | {r['class_a']} | {r['split_a']} | {r['path_b']} "
               f"| {r['class_b']} | {r['split_b']} |" for r in rows[:show]]
    return "\n".join(md) + "\n"


def run_audit(source: str | Path | None = None, *, data: str | None = None, size: int = 64,
              split_file: str | Path | None = None, threshold: int = THRESHOLD, hash_size: int = HASH_SIZE,
              out: str | Path | None = None, data_dir: str | None = None, workers: int = 1) -> dict:
    """Audit a source folder or a prepared dataset; write audit.md, audit.json, audit_pairs.csv and
    audit_unreadable.csv (the JSON has the summary and every unreadable and hidden file, for scripts)."""
    if (source is None) == (data is None):
        raise BloodcellError("give exactly one of --source DIR or --data NAME")
    for opt, v, low in (("--threshold", threshold, 0), ("--hash-size", hash_size, 2)):
        if isinstance(v, bool) or not isinstance(v, int) or v < low:
            raise BloodcellError(f"{opt} must be a whole number >= {low}, got {v!r}")
    if split_file is not None and source is None:
        raise BloodcellError("--split-file applies to --source (a prepared dataset already has its splits)")
    if source is not None:
        items = items_from_folder(source, split_file, hash_size, workers)
        what = str(source)
        out = Path(out) if out else Path(f"audit_{Path(source).expanduser().resolve().name}")
    else:
        from bloodcell.data.store import load_dataset

        d = load_dataset(data, size, data_dir)
        items = items_from_dataset(d, hash_size)
        what = f"{d.meta.get('name', data)} {d.size}px"
        out = Path(out) if out else d.path.parent / f"{Path(d.path).stem}_audit"
    rows = find_duplicates(items, threshold)
    s = summarise(rows, items, threshold, hash_size)
    write_text(out / "audit_pairs.csv", pairs_csv(rows))
    write_text(out / "audit_unreadable.csv", unreadable_csv(items.unreadable))
    write_text(out / "audit.md", audit_markdown(s, rows, items.unreadable, what))
    write_json(out / "audit.json", {"audited": what, "summary": s, "unreadable": items.unreadable,
                                    "hidden": items.hidden})
    return {"summary": s, "pairs": rows, "unreadable": items.unreadable, "hidden": items.hidden, "out": str(out)}
