"""``bloodcell predict``: classify image files with a trained run, to the terminal and CSV/JSON/XLSX."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from bloodcell.commands.common import (
    add_checkpoint_arg,
    add_device_arg,
    add_max_pixels_arg,
    apply_max_pixels,
    positive_int,
)
from bloodcell.errors import BloodcellError

OUT_FORMATS = (".csv", ".json", ".xlsx")


def check_out_file(out: Path) -> None:
    """Refuse an output path that cannot be written before any work is done."""
    if out.suffix.lower() not in OUT_FORMATS:
        raise BloodcellError(f"--out {out}: write .csv, .json or .xlsx (not '{out.suffix or 'no extension'}')")
    if out.is_dir():
        raise BloodcellError(f"--out {out}: is a folder; give a file name")
    parent = out.parent if str(out.parent) else Path(".")
    for p in (parent, *parent.parents):
        if p.exists():
            if not p.is_dir():
                raise BloodcellError(f"--out {out}: {p} is not a folder")
            break


def rows_of(results, k: int) -> tuple[list[str], list[list]]:
    header = ["path", "error", "warning", *[f"{x}{i + 1}" for i in range(k) for x in ("class", "prob")]]
    rows = [[r.path, r.error or "", "; ".join(r.warnings),
             *[v for c, p in (r.top or []) for v in (c, round(p, 6))]] for r in results]
    return header, rows


def write_results(out: Path, results) -> None:
    from bloodcell.io import atomic_write, csv_text, write_json, write_text

    k = max((len(r.top) for r in results if r.top), default=0)
    suffix = out.suffix.lower()
    if suffix == ".json":
        write_json(out, [{"path": r.path, "error": r.error, "warnings": r.warnings,
                          "top": [{"class": c, "probability": p} for c, p in (r.top or [])]} for r in results])
    elif suffix == ".xlsx":
        from openpyxl import Workbook

        header, rows = rows_of(results, k)
        wb = Workbook()
        ws = wb.active
        ws.title = "predictions"
        for row in [header, *rows]:
            ws.append(row)
        atomic_write(out, wb.save)
    else:
        header, rows = rows_of(results, k)
        write_text(out, csv_text(header, rows))


def cmd_predict(a: argparse.Namespace) -> int:
    from bloodcell.inference import Classifier

    apply_max_pixels(a)
    out = Path(a.out) if a.out else None
    if out:
        check_out_file(out)
    clf = Classifier.from_run(a.run_dir, a.checkpoint, device=a.device)
    results = clf.predict_files(a.paths, top_k=a.top_k)
    if not results:
        raise BloodcellError("no image files found in the given paths")
    good = 0
    for r in results:
        if r.error:
            print(f"{r.path}\tERROR: {r.error}")
            continue
        good += 1
        alts = ", ".join(f"{c} {p:.3f}" for c, p in r.top[1:])
        line = f"{r.path}\t{r.top[0][0]}\t{r.top[0][1]:.4f}" + (f"\t({alts})" if alts else "")
        print(line + "".join(f"\tWARNING: {w}" for w in r.warnings))
    if out:
        write_results(out, results)
        print(f"wrote {out}")
    print(f"classified {good} of {len(results)} file(s)", file=sys.stderr)
    return 0 if good else 1


def add_commands(sub) -> None:
    pd = sub.add_parser("predict", help="classify image files or folders with a trained run",
                        description="Classify JPEG/PNG/TIFF/BMP/GIF/WebP files of any mode (RGB, grey, RGBA, "
                        "16-bit) up to --max-pixels with exactly the preprocessing the model was trained with. Bad "
                        "files are reported and skipped; images much smaller than the training crop get a "
                        "warning. The exit status is 1 only if no file could be classified.")
    pd.add_argument("run_dir", help="a run folder (or a .safetensors weights file)")
    pd.add_argument("paths", nargs="+", metavar="PATH", help="image files or folders (searched recursively)")
    pd.add_argument("--top-k", type=positive_int, default=3, help="classes to show per file (default: %(default)s)")
    pd.add_argument("--out", help="also write the results to FILE.csv, FILE.json or FILE.xlsx")
    add_checkpoint_arg(pd)
    add_device_arg(pd)
    add_max_pixels_arg(pd)
    pd.set_defaults(func=cmd_predict)
