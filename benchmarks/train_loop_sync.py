"""SE-CNN training throughput of the training loop before and after a change, in one run, alternating rounds.

Why: the loop used to read the loss and the correct count back to the host after every batch (``.item()``) and
call ``os.getloadavg()`` per batch; it now keeps both on the device and samples the load once per epoch. On a
GPU such reads stall the pipeline; on a CPU they cost little. This measures what the change gives on this machine.

How: the package as it was at ``--before`` (a git commit) is extracted with ``git archive`` and run from its
own ``src``; both versions train the same command in fresh processes, alternating ``--rounds`` times, and the
training seconds each prints (``train N.Ns``, validation excluded) give images/s. Nothing else should run.

Usage (from the project root, after ``bloodcell data prepare --source ../shared/data/pbc --split-file
../shared/data/pbc/split.csv --name pbc``):
    BLOODCELL_DATA_DIR=/tmp/bcdata python benchmarks/train_loop_sync.py --before 5386d1c --rounds 3
"""

from __future__ import annotations

import argparse
import io
import json
import os
import re
import statistics
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def extract(commit: str, into: Path) -> Path:
    data = subprocess.run(["git", "-C", str(ROOT), "archive", commit, "src"], check=True, capture_output=True).stdout
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        tar.extractall(into, filter="data")
    return into / "src"


def train_seconds(src: Path, out: Path, args: argparse.Namespace) -> tuple[float, int]:
    cmd = [sys.executable, "-m", "bloodcell", "train", "--model", "se-cnn", "--data", args.data, "--size", "64",
           "--epochs", "1", "--train-limit", str(args.train_limit), "--schedule", "cosine", "--augment", "dihedral",
           "--threads", str(args.threads), "--out", str(out)]
    env = {**os.environ, "PYTHONPATH": str(src)}
    p = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if p.returncode:
        raise SystemExit(f"{src}: training failed: {p.stderr.strip().splitlines()[-1:]}")
    seconds = float(re.search(r"\(train ([0-9.]+)s", p.stdout + p.stderr).group(1))
    images = json.loads((out / "metrics.json").read_text())["training"]["train_images"]
    return seconds, images


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--before", default="5386d1c", help="git commit of the old loop (default: %(default)s)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--train-limit", type=int, default=4096, help="training images per round (default: %(default)s)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--data", default="pbc")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "train_loop_sync.md"),
                   help="markdown file for the figures (default: %(default)s)")
    a = p.parse_args(argv)
    sys.path.insert(0, str(ROOT / "src"))
    from bloodcell.machine import cpu_name

    with tempfile.TemporaryDirectory() as tmp:
        old_src = extract(a.before, Path(tmp) / "old")
        versions = {f"before ({a.before})": old_src, "after (working tree)": ROOT / "src"}
        rates: dict[str, list[float]] = {k: [] for k in versions}
        for r in range(a.rounds):
            for name, src in versions.items():
                s, n = train_seconds(src, Path(tmp) / f"{r}-{name.split()[0]}", a)
                rates[name].append(n / s)
                print(f"round {r + 1}: {name:<24} {n / s:7.1f} images/s ({n} images in {s:.1f}s)", flush=True)
    best = {k: max(v) for k, v in rates.items()}
    median = {k: statistics.median(v) for k, v in rates.items()}
    (before, b), (after, c) = best.items()
    (mb, mc) = median.values()
    summary = (f"SE-CNN training, 64x64, batch 64, {a.train_limit} images per round, {a.threads} threads, "
               f"{cpu_name()}; {a.rounds} alternating rounds: best {before} {b:.1f} images/s, {after} {c:.1f} images/s "
               f"(ratio {c / b:.3f}); median {mb:.1f} vs {mc:.1f} (ratio {mc / mb:.3f})")
    print("\n" + summary)
    rows = "\n".join(f"| {k} | " + " | ".join(f"{x:.1f}" for x in v) + f" | {max(v):.1f} | {statistics.median(v):.1f} |"
                     for k, v in rates.items())
    header = "| version | " + " | ".join(f"round {i + 1}" for i in range(a.rounds)) + " | best | median |"
    Path(a.out).write_text(
        f"# Training loop: per-batch host reads removed\n\nCommand: `BLOODCELL_DATA_DIR=... python "
        f"benchmarks/train_loop_sync.py --before {a.before} --rounds {a.rounds} --train-limit {a.train_limit}` on "
        f"{cpu_name()}, {a.threads} threads.\n\nTraining images/s (validation excluded), SE-CNN, 64x64, batch 64, "
        f"dihedral augmentation, cosine schedule, one epoch of {a.train_limit} PBC training images per round, each "
        f"round in a fresh process:\n\n{header}\n|---|" + "---|" * (a.rounds + 2) + f"\n{rows}\n\n{summary}.\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
