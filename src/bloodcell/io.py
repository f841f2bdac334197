"""Atomic file writes: an interrupted run never leaves a half-written file behind."""

from __future__ import annotations

import csv
import hashlib
import io
import json
import math
import numbers
import os
import sys
import tempfile
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any


def current_umask() -> int:
    """The process umask, read from /proc (no side effect) or, elsewhere, by setting and restoring it."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    old = os.umask(0o022)  # racy with threads that create files at this instant; acceptable for a CLI
    os.umask(old)
    return old


def atomic_write(path: str | Path, write: Callable[[str], None]) -> None:
    """Call ``write(tmp_path)`` then rename the temporary file over ``path`` in one step.

    mkstemp creates the temporary file as 0600 whatever the umask; it gets the mode a plain ``open`` would
    give (0666 minus the umask) before the rename, so colleagues sharing a data folder can read our files.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~current_umask())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def file_sha256(path: str | Path) -> str:
    """SHA-256 of a file's bytes, read in 1 MiB blocks (weights, models and datasets can be large)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def write_text(path: str | Path, text: str) -> None:
    def _write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)

    atomic_write(path, _write)


def json_safe(obj: Any) -> Any:
    """``obj`` with NaN/Infinity as None and numpy scalars/arrays as Python values, for strict JSON readers.

    Without this, NaN is written as the non-JSON token ``NaN`` and a numpy integer falls to ``default=str``
    and becomes a string. (numpy is recognised without importing it, so the CLI's ``--help`` stays fast.)
    """
    if isinstance(obj, dict):
        return {_json_key(k): json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    if isinstance(obj, (set, frozenset)):
        return [json_safe(v) for v in sorted(obj, key=repr)]
    if isinstance(obj, (bool, str)) or obj is None:
        return obj
    if type(obj).__module__ == "numpy" and hasattr(obj, "tolist"):  # arrays and scalars, np.bool_ included
        return json_safe(obj.tolist())
    if isinstance(obj, numbers.Integral):
        return int(obj)
    if isinstance(obj, numbers.Real):
        f = float(obj)
        return f if math.isfinite(f) else None
    return obj


def _json_key(key: Any) -> Any:
    return key.item() if type(key).__module__ == "numpy" and hasattr(key, "item") else key


def write_json(path: str | Path, obj: Any) -> None:
    """Strict JSON (no NaN/Infinity: non-finite numbers become null); unknown objects are written as text."""
    write_text(path, json.dumps(json_safe(obj), indent=2, sort_keys=False, default=str, allow_nan=False) + "\n")


def warn(message: str) -> None:
    """One ``bloodcell: warning: ...`` line on stderr (Python's warnings print two lines and a source line)."""
    from bloodcell.errors import one_line

    print(f"bloodcell: warning: {one_line(message)}", file=sys.stderr, flush=True)


def csv_text(header: list[str], rows: Iterable[dict | Sequence]) -> str:
    """CSV with a header line; rows are dicts keyed by the header or sequences in its order."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(header)
    for r in rows:
        w.writerow([r.get(h, "") for h in header] if isinstance(r, dict) else list(r))
    return buf.getvalue()


def read_json(path: str | Path) -> Any:
    from bloodcell.errors import BloodcellError

    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        raise BloodcellError(f"{path}: file not found") from None
    except IsADirectoryError:
        raise BloodcellError(f"{path}: is a folder, expected a JSON file") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise BloodcellError(f"{path}: not valid JSON ({e})") from None
    except OSError as e:
        raise BloodcellError(f"{path}: cannot read ({e.strerror or e})") from None


def markdown_table(header: list, rows) -> str:
    """A GitHub markdown table; cells are written with ``str``."""
    out = ["| " + " | ".join(map(str, header)) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(out)
