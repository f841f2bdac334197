"""Copy what a suite's report needs (not the weights) from the run folders into benchmarks/results/paper/.

Usage: python benchmarks/sync_paper_results.py [RUNS_ROOT] [DEST]
       (defaults: runs/benchmarks, benchmarks/results/paper)
       python benchmarks/sync_paper_results.py --restore [DEST] [RUNS_ROOT]

--restore goes the other way, for a fresh clone: it copies each committed finished run into the runs root unless
that run folder already exists there, so `bloodcell benchmark` finds them "done" and skips them, and the suite
report it writes still holds every row (a copy is done because it has config.json and a finished metrics.json).

The copies are valid run folders for reporting: `bloodcell benchmark SUITE --report-only --out DEST` and
`bloodcell benchmark compare DEST/...` rebuild the tables and figures from them alone.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

RUN_FILES = ("config.json", "metrics.json", "history.csv", "confusion_test.csv",
             "history_autoencoder.csv", "autoencoder_reconstructions.png")  # the last two: AutoClassifier only
SUITE_SUFFIXES = (".md", ".csv", ".json", ".png")


def sync(src: Path, dest: Path) -> int:
    n = 0
    for suite in sorted(p for p in src.iterdir() if p.is_dir()):
        for f in suite.iterdir():
            if f.is_file() and f.suffix in SUITE_SUFFIXES:
                (dest / suite.name).mkdir(parents=True, exist_ok=True)
                shutil.copy2(f, dest / suite.name / f.name)
                n += 1
        for run in sorted(suite.glob("*/seed*")):
            if not (run / "metrics.json").is_file():
                continue
            target = dest / suite.name / run.relative_to(suite)
            target.mkdir(parents=True, exist_ok=True)
            for name in RUN_FILES:
                if (run / name).is_file():
                    shutil.copy2(run / name, target / name)
                    n += 1
    return n


def restore(results: Path, runs: Path) -> int:
    n = 0
    for run in sorted(results.glob("*/*/seed*")):
        target = runs / run.relative_to(results)
        if not (run / "metrics.json").is_file() or target.exists():
            continue
        shutil.copytree(run, target)
        n += 1
    return n


def main(argv: list[str] | None = None) -> int:
    import argparse

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--restore", action="store_true", help="copy committed finished runs back into a runs root")
    ap.add_argument("first", nargs="?", help="RUNS_ROOT (DEST with --restore)")
    ap.add_argument("second", nargs="?", help="DEST (RUNS_ROOT with --restore)")
    a = ap.parse_args(argv)
    if a.restore:
        dest, runs = Path(a.first or "benchmarks/results/paper"), Path(a.second or "runs/benchmarks")
        if not dest.is_dir():
            ap.error(f"{dest}: results folder not found")
        print(f"restored {restore(dest, runs)} finished runs from {dest} to {runs}")
        return 0
    src, dest = Path(a.first or "runs/benchmarks"), Path(a.second or "benchmarks/results/paper")
    if not src.is_dir():
        ap.error(f"{src}: runs folder not found")
    print(f"copied {sync(src, dest)} files from {src} to {dest}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
