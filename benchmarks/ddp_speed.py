"""Data-parallel training on one machine: 2 processes x 1 thread against 1 process x 2 threads, in one run.

SE-CNN, 64x64, one epoch of ``--train-limit`` PBC training images per round, each round a fresh process (or
torchrun job), the two set-ups alternating; training seconds as each run prints them (``train N.Ns``,
validation excluded). Nothing else should run.

Usage (after ``bloodcell data prepare --source ../shared/data/pbc --split-file ../shared/data/pbc/split.csv
--name pbc``):
    BLOODCELL_DATA_DIR=/tmp/bcdata python benchmarks/ddp_speed.py --rounds 3
"""

from __future__ import annotations

import argparse
import re
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SETUPS = {"1 process x 2 threads": ["--threads", "2"], "2 processes x 1 thread": ["--nproc", "2", "--threads", "1"]}


def seconds(extra: list[str], out: Path, a: argparse.Namespace) -> float:
    cmd = [sys.executable, "-m", "bloodcell", "train", "--model", "se-cnn", "--data", a.data, "--size", "64",
           "--epochs", "1", "--train-limit", str(a.train_limit), "--out", str(out), *extra]
    p = subprocess.run(cmd, capture_output=True, text=True)
    if p.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed: {p.stderr.strip().splitlines()[-3:]}")
    return float(re.search(r"\(train ([0-9.]+)s", p.stdout + p.stderr).group(1))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--train-limit", type=int, default=4096)
    p.add_argument("--data", default="pbc")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "ddp_speed.md"))
    a = p.parse_args(argv)
    sys.path.insert(0, str(ROOT / "src"))
    from bloodcell.machine import cpu_name

    rates: dict[str, list[float]] = {k: [] for k in SETUPS}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(a.rounds):
            for k, (name, extra) in enumerate(SETUPS.items()):
                s = seconds(extra, Path(tmp) / f"{r}-{k}", a)
                rates[name].append(a.train_limit / s)
                print(f"round {r + 1}: {name:<24} {a.train_limit / s:7.1f} images/s ({s:.1f}s)", flush=True)
    med = {k: statistics.median(v) for k, v in rates.items()}
    (one, m1), (two, m2) = med.items()
    summary = (f"SE-CNN, 64x64, batch 64 (global), {a.train_limit} images per round, {cpu_name()}; median of "
               f"{a.rounds} alternating rounds: {one} {m1:.1f} images/s, {two} {m2:.1f} images/s "
               f"(ratio {m2 / m1:.3f})")
    print("\n" + summary)
    header = "| set-up | " + " | ".join(f"round {i + 1}" for i in range(a.rounds)) + " | median |"
    rows = "\n".join(f"| {k} | " + " | ".join(f"{x:.1f}" for x in v) + f" | {med[k]:.1f} |" for k, v in rates.items())
    Path(a.out).write_text(f"# Data-parallel training on one CPU\n\nCommand: `BLOODCELL_DATA_DIR=... python "
                           f"benchmarks/ddp_speed.py --rounds {a.rounds} --train-limit {a.train_limit}`.\n\n"
                           f"Training images/s (validation excluded):\n\n{header}\n|---|" + "---|" * (a.rounds + 1)
                           + f"\n{rows}\n\n{summary}.\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
