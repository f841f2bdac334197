"""``bloodcell predict``: classify image files with a trained run (PyTorch) or an exported bundle (ONNX Runtime, no
torch imported), to the terminal and CSV/JSON/XLSX."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from bloodcell.choices import TTA
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


TRUST_COLUMNS = ("status", "review", "out_of_distribution", "ood_score", "conformal_set")


def _cell(value):
    if isinstance(value, (list, tuple)):
        return " ".join(map(str, value))
    return "" if value is None else (round(value, 6) if isinstance(value, float) else value)


def rows_of(results, k: int) -> tuple[list[str], list[list]]:
    """CSV/XLSX rows: the file, its error or warnings, its trust flags (when any), then the top-k classes."""
    trust = [c for c in TRUST_COLUMNS if any(c in r.flags for r in results)]
    header = ["path", "error", "warning", *trust, *[f"{x}{i + 1}" for i in range(k) for x in ("class", "prob")]]
    rows = [[r.path, r.error or "", "; ".join(r.warnings), *[_cell(r.flags.get(c)) for c in trust],
             *[v for c, p in (r.top or []) for v in (c, round(p, 6))]] for r in results]
    return header, rows


def write_results(out: Path, results) -> None:
    from bloodcell.io import atomic_write, csv_text, write_json, write_text

    k = max((len(r.top) for r in results if r.top), default=0)
    suffix = out.suffix.lower()
    if suffix == ".json":
        write_json(out, [{"path": r.path, "error": r.error, "warnings": r.warnings, "flags": r.flags,
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


ENGINES = ("torch", "onnx")


def cached_bundle(run: Path, checkpoint: str) -> Path:
    """RUN/.bundle-CHECKPOINT: an fp32 export of the run, made on first use and re-made when the weights change.

    A cache hit imports no torch (the weights file is only hashed), so the fast path stays fast.
    """
    from bloodcell.runtime.bundle import file_sha256, read_bundle

    ensemble = (run / "ensemble.json").is_file()  # its members' weights are checked as well
    weights = run / "ensemble.json" if ensemble else run / f"{checkpoint}.safetensors" if run.is_dir() else run
    cache = (run if run.is_dir() else run.parent) / (f".bundle-{checkpoint}" if run.is_dir()
                                                      else f".bundle-{run.stem}")
    if weights.is_file() and (cache / "bundle.json").is_file():
        try:
            source = read_bundle(cache)["source"]
            if source["weights_sha256"] == file_sha256(weights) and all(
                    file_sha256(m["weights"]) == m["weights_sha256"] for m in source.get("members") or []):
                return cache
        except (BloodcellError, KeyError, TypeError, OSError):
            pass  # an unreadable or stale cache is simply rebuilt
    from bloodcell.deploy import export_bundle

    print(f"exporting {run} to ONNX once, into {cache} (re-used until the weights change)", file=sys.stderr)
    export_bundle(run, cache, checkpoint=checkpoint, parity_data="auto", log=lambda s: None)
    return cache


def load_predictor(a: argparse.Namespace):
    """The run's Classifier (torch) or a bundle's ONNX Runtime predictor; a bundle never imports torch."""
    from bloodcell.runtime.bundle import is_bundle

    target = Path(a.run_dir)
    bundle = is_bundle(target)
    engine = a.engine or ("onnx" if bundle else "torch")
    if engine == "torch":
        if bundle:
            raise BloodcellError(f"{target}: is an exported bundle, which runs with --engine onnx (its run folder "
                                 "runs with --engine torch)")
        if a.precision != "fp32":
            raise BloodcellError("--precision int8 runs an exported int8 model: give a bundle made with "
                                 "'bloodcell export RUN --out BUNDLE --int8' (or --engine onnx)")
        from bloodcell.inference import Classifier

        return Classifier.from_run(target, a.checkpoint, device=a.device)
    if a.device not in ("auto", "cpu"):
        raise BloodcellError(f"--engine onnx runs on the CPU; --device {a.device} is for --engine torch")
    if not bundle:
        if a.precision != "fp32":
            raise BloodcellError(f"--precision {a.precision} needs a bundle exported with it: 'bloodcell export "
                                 f"{target} --out BUNDLE --int8', then 'bloodcell predict BUNDLE ...'")
        if not target.exists():
            raise BloodcellError(f"{target}: run folder, weights file or bundle not found")
        target = cached_bundle(target, a.checkpoint)
    from bloodcell.runtime import load

    return load(target, precision=a.precision, spinning=False)


def cmd_predict(a: argparse.Namespace) -> int:
    apply_max_pixels(a)
    out = Path(a.out) if a.out else None
    if out:
        check_out_file(out)
    clf = load_predictor(a)
    trust = {k: v for k, v in (("tta", a.tta), ("review_below", a.review_below),
                                ("target_accuracy", a.target_accuracy), ("conformal", a.conformal)) if v is not None}
    if trust and not hasattr(clf, "check_trust_options"):
        raise BloodcellError(f"--{sorted(trust)[0].replace('_', '-')} runs with --engine torch (the run folder); "
                             "the ONNX runtime does not offer it yet")
    results = clf.predict_files(a.paths, top_k=a.top_k, **trust)
    if not results:
        raise BloodcellError("no image files found in the given paths")
    good = 0
    for r in results:
        if r.error:
            print(f"{r.path}\tERROR: {r.error}")
            continue
        good += 1
        alts = ", ".join(f"{c} {p:.3f}" for c, p in r.top[1:])
        status = r.flags.get("status", "ok")
        if r.flags.get("out_of_distribution"):  # never shown as a confident class
            line = f"{r.path}\tNOT A BLOOD-CELL IMAGE?\t(closest class {r.top[0][0]} {r.top[0][1]:.3f})"
        else:
            line = f"{r.path}\t{r.top[0][0]}\t{r.top[0][1]:.4f}" + (f"\t({alts})" if alts else "")
            line += "\tREVIEW" if status == "review" else ""
        if r.flags.get("conformal_set") is not None:
            line += f"\tset {{{', '.join(r.flags['conformal_set'])}}}"
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
                        "warning. The exit status is 1 only if no file could be classified. A bundle folder from "
                        "'bloodcell export' runs with ONNX Runtime and needs no PyTorch.")
    pd.add_argument("run_dir", metavar="RUN_OR_BUNDLE",
                    help="a run folder, a .safetensors weights file, or a bundle folder from 'bloodcell export'")
    pd.add_argument("paths", nargs="+", metavar="PATH", help="image files or folders (searched recursively)")
    pd.add_argument("--top-k", type=positive_int, default=3, help="classes to show per file (default: %(default)s)")
    pd.add_argument("--out", help="also write the results to FILE.csv, FILE.json or FILE.xlsx")
    pd.add_argument("--engine", choices=ENGINES, default=None,
                    help="'torch' runs the run's weights with PyTorch; 'onnx' runs a bundle with ONNX Runtime (for a "
                         "run folder: exported once into RUN/.bundle-CHECKPOINT and re-used while the weights are "
                         "unchanged) (default: onnx for a bundle, torch for a run)")
    pd.add_argument("--precision", choices=("fp32", "int8"), default="fp32",
                    help="which model of a bundle to run: int8 needs a bundle exported with --int8 "
                         "(default: %(default)s)")
    pd.add_argument("--tta", choices=TTA, default=None,
                    help="test-time augmentation: average over flips or the 8 symmetries of the square, one batched "
                         "pass (default: what 'bloodcell calibrate' chose, else none)")
    pd.add_argument("--review-below", type=float, default=None, metavar="P",
                    help="mark files whose (calibrated) confidence is below P as REVIEW (default: the threshold "
                         "'bloodcell calibrate' chose, if any)")
    pd.add_argument("--target-accuracy", type=float, default=None, metavar="A",
                    help="instead of --review-below: the threshold calibrate chose on validation for accuracy A "
                         "(e.g. 0.995)")
    pd.add_argument("--conformal", type=float, default=None, metavar="ALPHA",
                    help="also print each file's conformal set of classes, which holds the true class with "
                         "probability at least 1-ALPHA (needs 'bloodcell calibrate')")
    add_checkpoint_arg(pd)
    add_device_arg(pd)
    add_max_pixels_arg(pd)
    pd.set_defaults(func=cmd_predict)
