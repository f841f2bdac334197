"""How fast the data path is: preparing 64x64 from all PBC JPEGs (1 process vs all cores) and loading it back.

Usage (from the project root): python benchmarks/data_speed.py [--source ../shared/data/pbc]
Writes benchmarks/results/data_speed.json and .md. Uses a temporary dataset folder; the user cache is untouched.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np

from bloodcell.data.sources import prepare_from_folder
from bloodcell.data.store import load_dataset
from bloodcell.data.tensors import split_tensors
from bloodcell.io import write_json, write_text
from bloodcell.machine import machine_info

ROOT = Path(__file__).resolve().parent


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--source", default=str(ROOT.parent.parent / "shared" / "data" / "pbc"))
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--out", default=str(ROOT / "results" / "data_speed"))
    a = p.parse_args()
    src = Path(a.source)
    res = {"source": "PBC (../shared/data/pbc) with split.csv", "size": a.size, "cores": os.cpu_count(),
           "machine": machine_info()}
    with tempfile.TemporaryDirectory() as tmp:
        for workers in (1, os.cpu_count() or 1):
            t0 = time.perf_counter()
            info = prepare_from_folder(src, a.size, split_file=src / "split.csv", name="pbc", root=tmp,
                                       force=True, workers=workers, progress=False)
            res[f"prepare_seconds_workers{workers}"] = round(time.perf_counter() - t0, 2)
            res[f"decode_seconds_workers{workers}"] = info["decode_seconds"]
        res["images"] = sum(sum(c) for c in info["counts"].values())
        res["skipped"] = len(info["skipped"])
        t0 = time.perf_counter()
        prepare_from_folder(src, a.size, split_file=src / "split.csv", name="pbc", root=tmp, progress=False)
        res["cache_check_seconds"] = round(time.perf_counter() - t0, 2)
        loads = []
        for _ in range(5):
            t0 = time.perf_counter()
            d = load_dataset("pbc", a.size, tmp)
            x, _ = split_tensors(d, "train")
            loads.append(time.perf_counter() - t0)
        res["load_seconds_median"] = round(float(np.median(loads)), 3)
        res["train_tensor"] = f"{tuple(x.shape)} {x.dtype}"
        res["npz_mb"] = round(Path(info["npz"]).stat().st_size / 1e6, 1)
    w = os.cpu_count() or 1
    res["prepare_speedup"] = round(res["prepare_seconds_workers1"] / res[f"prepare_seconds_workers{w}"], 2)
    write_json(a.out + ".json", res)
    md = "\n".join([
        "# Data path speed", "",
        f"Command: `python benchmarks/data_speed.py` ({res['machine']['cpu']}, {res['cores']} cores, "
        f"{res['images']} PBC JPEGs -> "
        f"{a.size}x{a.size}, {res['skipped']} skipped).", "",
        "| step | seconds |", "|---|---|",
        f"| prepare, 1 process (decode {res['decode_seconds_workers1']}s) "
        f"| {res['prepare_seconds_workers1']} |",
        f"| prepare, {w} processes (decode {res[f'decode_seconds_workers{w}']}s) "
        f"| {res[f'prepare_seconds_workers{w}']} |",
        f"| cache check when nothing changed (hash all inputs) | {res['cache_check_seconds']} |",
        f"| load prepared npz ({res['npz_mb']} MB) into uint8 tensors, median of 5 | {res['load_seconds_median']} |",
        "", f"Prepare speed-up with {w} processes: {res['prepare_speedup']}x. Train tensor: {res['train_tensor']}.", "",
    ])
    write_text(a.out + ".md", md)
    print(md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
