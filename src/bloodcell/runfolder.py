"""Conventions of run folders that several commands share: how to find them and what to call them."""

from __future__ import annotations

import re
from pathlib import Path

from bloodcell.errors import BloodcellError


def run_label(run: Path) -> str:
    """``ENTRY`` for ``.../ENTRY/seedN`` folders, else the folder's own name."""
    return run.parent.name if re.fullmatch(r"seed\d+", run.name) else run.name


RUN_MARKERS = ("config.json", "ensemble.json")  # a run folder; an ensemble folder (``bloodcell ensemble``)


def is_run_or_ensemble(d: Path) -> bool:
    return any((d / name).is_file() for name in RUN_MARKERS)


def find_runs(dirs: list[str | Path]) -> list[Path]:
    """Run and ensemble folders in ``dirs``: each dir that is one, else every one below it."""
    runs: list[Path] = []
    for d in map(Path, dirs):
        if not d.is_dir():
            raise BloodcellError(f"{d}: folder not found")
        found = [d] if is_run_or_ensemble(d) else sorted(
            {p.parent for name in RUN_MARKERS for p in d.rglob(name)})
        if not found:
            raise BloodcellError(f"{d}: no run folders (config.json) or ensembles (ensemble.json) in it")
        runs += [r for r in found if r not in runs]
    return runs
