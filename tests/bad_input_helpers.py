"""Shared by test_bad_input.py and test_fuzz.py: run the CLI in-process, check one-line errors, build tiny data."""

from __future__ import annotations

import contextlib
import io
import json
import re
import shutil
import sys
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from conftest import CLASSES, synthetic_arrays, synthetic_cell  # noqa: E402

__all__ = ["CLASSES", "synthetic_arrays", "synthetic_cell"]


def run_cli(args: list) -> tuple[int, str, str]:
    """``bloodcell ARGS`` in this process: (exit code, stdout, stderr).

    argparse's SystemExit becomes the exit code; any other exception escaping ``main`` fails the test with a
    one-line description (it would be a traceback for the user).
    """
    from bloodcell.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            rc = main([str(a) for a in args])
        except SystemExit as e:
            rc = e.code if isinstance(e.code, int) else (0 if e.code is None else 2)
        except Exception as e:  # noqa: BLE001 - anything escaping main is a traceback for the user
            raise AssertionError(
                f"exception escaped main({[str(a) for a in args]}): {type(e).__name__}: {e}; "
                f"stderr so far: {err.getvalue()!r}"
            ) from e
    return rc, out.getvalue(), err.getvalue()


def no_speed() -> list[str]:
    """``evaluate``'s flag to skip the speed measurement, on CLIs that measure speed by default (else nothing)."""
    from bloodcell.cli import build_parser

    evaluate = build_parser()._subparsers._group_actions[0].choices["evaluate"]
    return ["--no-speed"] if any("--no-speed" in a.option_strings for a in evaluate._actions) else []


def _named(line: str, want) -> bool:
    if isinstance(want, tuple):  # alternatives: any one of them
        return any(_named(line, w) for w in want)
    if isinstance(want, re.Pattern):
        return want.search(line) is not None
    return str(want) in line


def assert_one_line_error(rc, err: str, *must_contain, code: int = 2, strip: tuple = (),
                          allow_warnings: bool = False) -> str:
    """Exit ``code`` (2: BloodcellError), stderr exactly one line ``bloodcell: error: ...``, no traceback.

    Each of ``must_contain`` is a string, a compiled regex, or a tuple of alternatives, looked for in the line
    after removing the strings in ``strip`` (e.g. a tmp path that happens to contain a field name).
    ``allow_warnings``: ``bloodcell: warning:`` lines before the error are accepted. Returns the line.
    """
    assert "Traceback" not in err, f"traceback in stderr: {err[-600:]!r}"
    lines = [ln for ln in err.splitlines() if ln.strip()]
    if allow_warnings:
        while len(lines) > 1 and lines[0].startswith("bloodcell: warning:"):
            lines.pop(0)
    assert rc == code, f"exit status {rc}, expected {code}; stderr: {err.strip()[-400:]!r}"
    assert len(lines) == 1, f"expected one stderr line, got {len(lines)}: {err.strip()[-400:]!r}"
    line = lines[0]
    assert line.startswith("bloodcell: error:"), f"stderr line does not start with 'bloodcell: error:': {line!r}"
    checked = line
    for s in strip:
        checked = checked.replace(str(s), "")
    for want in must_contain:
        assert _named(checked, want), f"{want!r} not named in {line!r}"
    return line


def strict_json(text: str):
    """json.loads that refuses NaN / Infinity / -Infinity (invalid JSON that Python's json writes by default)."""

    def refuse(name):
        raise ValueError(f"non-standard JSON constant {name}")

    return json.loads(text, parse_constant=refuse)


def write_npz(path: Path, n_per_split: dict[str, int], size: int = 28, seed: int = 0, k: int = 8) -> Path:
    np.savez(path, **synthetic_arrays(n_per_split, size=size, k=k, seed=seed))
    return path


def make_image_tree(root: Path, classes=CLASSES, per_class: int = 4, size: int = 40, seed: int = 0) -> Path:
    """A small folder-per-class tree of PNG/JPEG files (``size`` x ``size + 1`` px)."""
    rng = np.random.default_rng(seed)
    for c, name in enumerate(classes):
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            arr = synthetic_cell(c, rng, size)
            arr = np.concatenate([arr, arr[:1]], axis=0)
            ext = "png" if i % 2 == 0 else "jpg"
            Image.fromarray(arr).save(root / name / f"{name}_{i:03d}.{ext}")
    return root


def train_tiny_run(out: Path, npz: Path, epochs: int = 1, extra: tuple = ()) -> Path:
    """An SE-CNN run at 28 px trained from ``npz`` (recorded by path, so no data dir is needed later)."""
    rc, so, se = run_cli(["train", "--model", "se-cnn", "--data", npz, "--size", "28", "--epochs", epochs,
                          "--batch-size", "32", "--threads", "1", "--out", out, *extra])
    assert rc == 0 and (out / "best.safetensors").is_file(), (rc, so[-500:], se[-500:])
    return out


def copy_run(run: Path, dest: Path) -> Path:
    shutil.copytree(run, dest, ignore=shutil.ignore_patterns(".lock"))
    return dest


def save_png(path: Path, shape=(40, 40), value: int = 200, mode: str = "RGB") -> Path:
    h, w = shape
    Image.fromarray(np.full((h, w, 3), value, np.uint8)).convert(mode).save(path)
    return path


def edit_weights_meta(path: Path, edit, header_extras: str = "keep") -> None:
    """Rewrite a bloodcell safetensors file with ``edit(meta)`` applied to its metadata, keeping the tensors.

    ``header_extras``: "keep" the other header entries as they are (e.g. a digest of the old metadata, now stale),
    or "drop" them, leaving only ``format`` and ``bloodcell`` (a file as written before such entries existed).
    """
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    with safe_open(str(path), "pt") as f:
        header = dict(f.metadata())
    tensors = load_file(str(path))
    meta = json.loads(header["bloodcell"])
    new = edit(meta)
    header["bloodcell"] = json.dumps(meta if new is None else new)
    if header_extras == "drop":
        header = {k: v for k, v in header.items() if k in ("format", "bloodcell")}
    save_file(tensors, str(path), metadata=header)
