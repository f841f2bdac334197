"""Conventions of run folders that several commands share: how to find them and what to call them."""

from __future__ import annotations

import re
from pathlib import Path

from bloodcell.errors import BloodcellError


def run_label(run: Path) -> str:
    """``ENTRY`` for ``.../ENTRY/seedN`` folders, else the folder's own name."""
    return run.parent.name if re.fullmatch(r"seed\d+", run.name) else run.name


def find_runs(dirs: list[str | Path]) -> list[Path]:
    """Run folders in ``dirs``: each dir that is a run, else every run below it."""
    runs: list[Path] = []
    for d in map(Path, dirs):
        if not d.is_dir():
            raise BloodcellError(f"{d}: folder not found")
        found = [d] if (d / "config.json").is_file() else sorted(p.parent for p in d.rglob("config.json"))
        if not found:
            raise BloodcellError(f"{d}: no run folders (config.json) in it")
        runs += [r for r in found if r not in runs]
    return runs
