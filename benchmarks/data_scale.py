"""Datasets larger than memory: peak memory and training speed of the in-memory npz path vs memory-mapped shards.

Usage (from the project root, on a quiet machine; the dataset must be prepared, e.g. BLOODCELL_DATA_DIR=/tmp/bcdata):
  python benchmarks/data_scale.py --data pbc --size 64 --out benchmarks/results/data_scale.json
  python benchmarks/data_scale.py --data pbc --size 64 --synthetic 1000000 --work /big/disk \
      --out benchmarks/results/data_scale_1m.json

For each variant, (a) ``memory``: the splits as in-memory arrays (the npz layout's path) and (b) ``shards``: the same
images as memory-mapped shards read batch by batch with prefetching, a fresh process loads the data, prepares the
training tensors and trains ``--batches`` batches of ``--model``; it reports images/s (timed from the first batch's
end to the last's), its peak RSS and its anonymous and file-backed resident memory at the end. Resident pages of the
memory maps count in RSS but are page cache the kernel can drop; ``rss_anon`` is what the process itself holds.
Variants alternate order in each of ``--rounds`` rounds, so drifting machine load hits both alike. ``--cold`` evicts
the variant's files from the page cache before each run (posix_fadvise DONTNEED, no root needed), as when a set
is larger than RAM.

``--synthetic N`` first builds a set of N training images (with the dataset's own val and test splits) as shards
in ``--work``, in bounded memory: the dataset's training images (in a seeded random order) repeated under cheap
deterministic changes (the 8 flips/rotations of the square, then 1-pixel shifts). The
``memory`` variant then reads it all into RAM first; it is skipped when the machine's available memory is short.
Prints a markdown table; writes JSON to ``--out`` and the table beside it (.md). Benchmarks are not tests.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from bloodcell.data.shards import MANIFEST, load_shards, write_shards
from bloodcell.data.store import SPLITS, PreparedData, load_dataset
from bloodcell.io import markdown_table, write_json, write_text
from bloodcell.machine import machine_info

VARIANTS = ("memory", "shards")


class Enough(Exception):
    """Raised from the save hook once the batches to time have run."""


# ------------------------------------------------------------------ the synthetic set
class SyntheticImages:
    """``n`` images made on demand from ``source`` (N0 x S x S x 3): copy ``j`` is image ``j % N0`` under variant
    ``j // N0``: one of the 8 symmetries of the square, then a shift of up to 1 pixel (np.roll)."""

    def __init__(self, source: np.ndarray, n: int):
        self.source, self.n = source, n
        self.shape = (n, *source.shape[1:])
        self.dtype = np.dtype(np.uint8)

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, positions: np.ndarray) -> np.ndarray:
        positions = np.asarray(positions)
        out = np.empty((len(positions), *self.source.shape[1:]), dtype=np.uint8)
        variants = positions // len(self.source)
        for v in np.unique(variants):
            sel = variants == v
            out[sel] = vary(self.source[positions[sel] % len(self.source)], int(v))
        return out


def vary(images: np.ndarray, v: int) -> np.ndarray:
    code, shift = v % 8, (v // 8) % 9
    x = images[:, :, ::-1] if code & 1 else images
    x = x[:, ::-1] if code & 2 else x
    x = x.transpose(0, 2, 1, 3) if code & 4 else x
    dy, dx = shift // 3 - 1, shift % 3 - 1
    return np.roll(x, (dy, dx), axis=(1, 2)) if dy or dx else np.ascontiguousarray(x)


def build_synthetic(data: PreparedData, n: int, folder: Path) -> Path:
    """Write the synthetic set as shards (a chunk at a time) unless ``folder`` already holds it."""
    if (folder / MANIFEST).is_file() and len(load_shards(folder).labels["train"]) == n:
        return folder
    order = np.random.default_rng(0).permutation(len(data.labels["train"]))  # every class in any first n copies
    src, src_labels = np.asarray(data.images["train"])[order], data.labels["train"][order]
    labels = src_labels[np.arange(n) % len(src)]
    meta = {k: v for k, v in data.meta.items() if k not in ("paths", "skipped", "layout", "shards")}
    meta.update(name=f"{meta.get('name', 'data')}_synthetic_{n}", size=data.size, class_names=data.class_names,
                counts={**data.counts(), "train": np.bincount(labels, minlength=data.num_classes).tolist()},
                fingerprint=f"synthetic-{n}-of-{data.meta.get('fingerprint')}",
                synthetic={"train_images": n, "from": data.meta.get("name"), "changes": "dihedral x 1px shifts"})
    images = {"train": SyntheticImages(src, n), "val": data.images["val"], "test": data.images["test"]}
    t0 = time.perf_counter()
    write_shards(folder, images, {"train": labels, "val": data.labels["val"], "test": data.labels["test"]}, meta)
    print(f"built {n} synthetic images as shards in {folder} ({time.perf_counter() - t0:.1f}s)", file=sys.stderr)
    return folder


# ------------------------------------------------------------------ one measurement (a child process)
def in_memory(data: PreparedData) -> PreparedData:
    """The same dataset with every split read into RAM (what the npz layout gives)."""
    if all(isinstance(data.images[s], np.ndarray) for s in SPLITS):
        return data
    return PreparedData({s: np.asarray(data.images[s]) for s in SPLITS}, data.labels, data.class_names, data.meta,
                        data.path)


def proc_status() -> dict:
    out = {}
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            key, _, value = line.partition(":")
            if key in ("VmHWM", "RssAnon", "RssFile"):
                out[key] = int(value.split()[0]) * 1024
    except OSError:
        pass
    return out


def measure(a: argparse.Namespace) -> dict:
    import torch

    from bloodcell.machine import set_threads
    from bloodcell.training import TrainConfig
    from bloodcell.training.loop import TrainState, build_model_and_optimizer, prepare_training_data, run_epoch

    set_threads(a.threads)
    t0 = time.perf_counter()
    data = load_shards(a.dataset) if a.worker == "shards" else in_memory(load_dataset(a.dataset, a.size))
    cfg = TrainConfig(model=a.model, data="bench", size=data.size, batch_size=a.batch_size, epochs=1,
                      augment="dihedral", threads=a.threads)
    td = prepare_training_data(cfg, data, torch.device("cpu"))
    load_s = time.perf_counter() - t0
    if len(td.y_train) <= (a.batches + 1) * a.batch_size:
        raise SystemExit(f"{a.batches} batches of {a.batch_size} need more than {len(td.y_train)} training images")
    torch.manual_seed(0)
    model, opt = build_model_and_optimizer(cfg, len(td.class_names), td.size, torch.device("cpu"))
    state = TrainState(model, opt, torch.amp.GradScaler("cpu", enabled=False), torch.Generator().manual_seed(0))
    ends: list[float] = []

    def at_batch_end(_inside: dict) -> None:  # called after every batch with save_every=0
        ends.append(time.perf_counter())
        if len(ends) > a.batches:
            raise Enough

    try:
        run_epoch(state, td, cfg, 0, save_every=0.0, on_save=at_batch_end)
    except Enough:
        pass
    status = proc_status()
    return {"variant": a.worker, "train_images": len(td.y_train), "load_seconds": round(load_s, 3),
            "images_per_s": round(a.batches * a.batch_size / (ends[-1] - ends[0]), 1),
            "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
            "rss_anon_mb": round(status.get("RssAnon", 0) / 2**20, 1),
            "rss_file_mb": round(status.get("RssFile", 0) / 2**20, 1), "threads": torch.get_num_threads()}


# ------------------------------------------------------------------ the driver
def evict(paths: list[Path]) -> None:
    """Drop these files' pages from the page cache (clean pages only; needs no privileges)."""
    for p in paths:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def files_of(dataset: str) -> list[Path]:
    p = Path(dataset)
    return sorted(p.glob("*.npy")) if p.is_dir() else ([p] if p.is_file() else [])


def child(a: argparse.Namespace, variant: str, dataset: str) -> dict:
    args = [sys.executable, __file__, "--worker", variant, "--dataset", dataset, "--size", str(a.size),
            "--model", a.model, "--batch-size", str(a.batch_size), "--batches", str(a.batches)]
    if a.threads:
        args += ["--threads", str(a.threads)]
    p = subprocess.run(args, capture_output=True, text=True)
    if p.returncode != 0:
        raise SystemExit(f"{variant} run failed:\n{p.stderr[-3000:]}")
    return json.loads(p.stdout.strip().splitlines()[-1])


def available_bytes() -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def datasets_to_compare(a: argparse.Namespace, work: Path) -> tuple[dict[str, str], dict]:
    """What each variant loads (a dataset name, an npz path or a shards folder), and a description."""
    data = load_dataset(a.data, a.size, a.data_dir)
    if a.synthetic:
        folder = build_synthetic(data, a.synthetic, work / f"synthetic_{a.synthetic}_{a.size}")
        return {"memory": str(folder), "shards": str(folder)}, {"train_images": a.synthetic, "synthetic": True}
    folder = work / f"{a.data}_{a.size}_shards"
    if not (folder / MANIFEST).is_file():
        write_shards(folder, data.images, data.labels, {**data.meta, "size": data.size,
                                                         "class_names": data.class_names})
    memory = str(data.path) if data.path and data.path.suffix == ".npz" else str(folder)
    return {"memory": memory, "shards": str(folder)}, {"train_images": len(data.labels["train"]), "synthetic": False}


def summarise(runs: list[dict]) -> list[dict]:
    rows = []
    for v in VARIANTS:
        mine = [r for r in runs if r["variant"] == v]
        if not mine:
            continue
        speed = [r["images_per_s"] for r in mine]
        rows.append({"variant": v, "runs": len(mine), "images_per_s_median": round(statistics.median(speed), 1),
                     "images_per_s_min": min(speed), "images_per_s_max": max(speed),
                     "peak_rss_mb_max": max(r["peak_rss_mb"] for r in mine),
                     "rss_anon_mb_median": round(statistics.median(r["rss_anon_mb"] for r in mine), 1),
                     "load_seconds_median": round(statistics.median(r["load_seconds"] for r in mine), 3)})
    return rows


def table(rows: list[dict]) -> str:
    header = ["variant", "runs", "images/s (median)", "min", "max", "peak RSS MB", "anon RSS MB", "load s"]
    return markdown_table(header, [[r["variant"], r["runs"], r["images_per_s_median"], r["images_per_s_min"],
                                    r["images_per_s_max"], r["peak_rss_mb_max"], r["rss_anon_mb_median"],
                                    r["load_seconds_median"]] for r in rows])


def run_rounds(a: argparse.Namespace, sources: dict[str, str], variants: list[str]) -> list[dict]:
    runs = []
    for r in range(a.rounds):
        for v in (variants if r % 2 == 0 else variants[::-1]):
            if a.cold:
                evict(files_of(sources[v]))
            res = child(a, v, sources[v])
            res["round"] = r + 1
            runs.append(res)
            print(f"round {r + 1} {v}: {res['images_per_s']} images/s, peak RSS {res['peak_rss_mb']} MB",
                  file=sys.stderr)
    return runs


def drive(a: argparse.Namespace) -> int:
    with tempfile.TemporaryDirectory(dir=a.work) as tmp:
        work = Path(a.work) if a.keep else Path(tmp)
        sources, described = datasets_to_compare(a, work)
        variants = [v for v in a.variants.split(",") if v]
        notes = []
        need = described["train_images"] * a.size * a.size * 3
        free = available_bytes()
        if "memory" in variants and a.synthetic and free is not None and need > 0.8 * free:
            variants.remove("memory")
            notes.append(f"memory variant skipped: the training images need {need / 2**30:.1f} GiB, "
                         f"{free / 2**30:.1f} GiB available")
        runs = run_rounds(a, sources, variants)
    rows = summarise(runs)
    command = "python benchmarks/data_scale.py " + " ".join(sys.argv[1:])
    res = {"command": command, "data": a.data, "size": a.size, "model": a.model, "batch_size": a.batch_size,
           "batches": a.batches, "rounds": a.rounds, "cold": a.cold, **described,
           "dataset_gib": round(need / 2**30, 3), "machine": machine_info(), "notes": notes, "summary": rows,
           "runs": runs}
    md = "\n".join([f"# Data at scale: {a.data} {a.size}px, {described['train_images']} training images"
                    f"{' (synthetic)' if a.synthetic else ''}", "",
                    f"Command: `{command}` ({res['machine']['cpu']}, {res['machine']['cores']} cores); {a.model}, "
                    f"batch {a.batch_size}, {a.batches} timed batches, {a.rounds} rounds"
                    f"{', cold page cache' if a.cold else ''}.", "", table(rows), "", *notes])
    print(md)
    if a.out:
        write_json(a.out, res)
        write_text(Path(a.out).with_suffix(".md"), md + "\n")
    return 0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default="pbc", help="a prepared dataset's name (default: %(default)s)")
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--data-dir", default=None, help="prepared datasets (default: $BLOODCELL_DATA_DIR)")
    p.add_argument("--model", default="se-cnn")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--batches", type=int, default=50, help="batches timed per run (default: %(default)s)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores)")
    p.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated: memory,shards")
    p.add_argument("--synthetic", type=int, default=None, metavar="N", help="build and measure N training images")
    p.add_argument("--work", default=None, help="folder for the shards built (default: a temporary folder)")
    p.add_argument("--keep", action="store_true", help="keep what is built in --work (to reuse it next time)")
    p.add_argument("--cold", action="store_true", help="evict the files from the page cache before each run")
    p.add_argument("--out", default=None, help="JSON results (and .md beside)")
    p.add_argument("--worker", choices=VARIANTS, help=argparse.SUPPRESS)
    p.add_argument("--dataset", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.keep and not a.work:
        p.error("--keep needs --work")
    if a.worker:
        print(json.dumps(measure(a)))
        return 0
    return drive(a)


if __name__ == "__main__":
    from bloodcell.errors import BloodcellError, one_line

    try:
        sys.exit(main())
    except BloodcellError as e:
        sys.exit(f"data_scale: error: {one_line(e)}")
