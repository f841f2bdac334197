"""Sub-commands of this feature: ``explain``, ``errors``, ``review`` and ``data audit``."""

from __future__ import annotations

import argparse
from pathlib import Path

from bloodcell.errors import BloodcellError


def cmd_explain(a: argparse.Namespace) -> int:
    from bloodcell.explain import runs

    if a.list_layers:
        return _list_layers(a)
    if not (a.paths or a.grid or a.report):
        raise BloodcellError("give image PATHs, --grid or --report (or --list-layers)")
    if a.paths:
        for r in runs.explain_files(a.run_dir, a.paths, a.layer, a.target, a.out, a.checkpoint):
            print(f"{r['path']}\tERROR: {r['error']}" if "error" in r else
                  f"{r['path']}\t{r['class']}\t{r['probability']:.4f}\t{r['png']}")
    if a.grid:
        print(f"wrote {runs.grid([a.run_dir, *(a.compare or [])], a.split, a.per_class, a.layer, a.out, a.checkpoint)}")
    if a.report:
        r = runs.report(a.run_dir, a.split, a.limit, a.layer, a.randomisation_images, a.checkpoint)
        print(runs.format_report(r))
        print(f"wrote {Path(a.run_dir) / 'explain' / 'gradcam_report.json'}, "
              f"{Path(a.run_dir) / 'explain' / 'gradcam_centre_share.png'}")
    return 0


def _list_layers(a: argparse.Namespace) -> int:
    from bloodcell.explain.gradcam import default_layer, spatial_layers
    from bloodcell.predict import Predictor

    pred = Predictor(a.run_dir, a.checkpoint)
    layers = spatial_layers(pred.model, int(pred.meta["input_size"]))
    default = default_layer(pred.model, layers)
    for x in layers:
        mark = "  (default)" if x.name == default else ""
        print(f"{x.name:<40}{x.type:<20}{'x'.join(map(str, x.shape))}{mark}")
    return 0


def cmd_errors(a: argparse.Namespace) -> int:
    from bloodcell.explain.errors import error_analysis

    r = error_analysis(a.run_dir, a.split, a.per_class, a.out, a.checkpoint)
    print(f"{r['n']} images, accuracy {r['accuracy']:.4f}, {r['errors']} errors")
    for p in r["pairs"][:10]:
        print(f"  {p['true']:>14} -> {p['predicted']:<14}{p['count']:>5}  ({p['share_of_true']:.1%} of {p['true']})")
    print("wrote " + ", ".join(r["files"].values()))
    return 0


def cmd_review(a: argparse.Namespace) -> int:
    from bloodcell.cli import _parse_model_args
    from bloodcell.explain.review import review_dataset

    model_args = _parse_model_args(a.model_arg)
    r = review_dataset(a.data, a.size, a.model, a.folds, a.epochs, a.out, a.data_dir, a.top, seed=a.seed,
                       threads=a.threads, model_args=model_args)
    print(f"{r['images']} train+val images, cross-validated accuracy {r['cv_accuracy']:.4f}, "
          f"{r['flagged']} flagged by cleanlab")
    for row in r["rows"][:10]:
        print(f"  {row['rank']:>4} {row['split']}#{row['index']:<6} {row['given_label']:>14} -> "
              f"{row['suggested_label']:<14} {row['score']:.4f}  {row['path']}")
    print(f"wrote {r['csv']} (edit 'action': keep/relabel/drop and 'new_label'), {r['gallery']}")
    return 0


def cmd_data_audit(a: argparse.Namespace) -> int:
    from bloodcell.data.audit import run_audit, summary_text

    r = run_audit(a.source, a.data, a.size, a.split_file, a.threshold, a.hash_size, a.out, a.data_dir, a.workers)
    print(summary_text(r["summary"]))
    for u in r["unreadable"][:20]:
        print(f"  unreadable: {u['path']}: {u['reason']}")
    for p in [p for p in r["pairs"] if p["conflicting_labels"] or p["across_splits"]][:20]:
        print(f"  {p['kind']} ({p['distance']} bits): {p['path_a']} [{p['class_a']}/{p['split_a']}] ~ "
              f"{p['path_b']} [{p['class_b']}/{p['split_b']}]")
    print(f"wrote {Path(r['out']) / 'audit.md'}, audit_pairs.csv, audit_unreadable.csv")
    return 0


def add_commands(sub, data_sub) -> None:
    from bloodcell.cli import DIR_HELP, _add_data_args

    ex = sub.add_parser("explain", help="Grad-CAM heatmaps of a run, per-class grids and a measured report",
                        description="Grad-CAM (captum LayerGradCam) on the last spatial layer by default.")
    ex.add_argument("run_dir", help="a run folder made by 'bloodcell train'")
    ex.add_argument("paths", nargs="*", metavar="PATH", help="image files or folders to explain")
    ex.add_argument("--layer", help="target layer name (see --list-layers; default: last spatial layer)")
    ex.add_argument("--class", dest="target", help="explain this class instead of the predicted one")
    ex.add_argument("--out", help="output folder (default: RUN_DIR/explain)")
    ex.add_argument("--list-layers", action="store_true", help="list the layers Grad-CAM can use")
    ex.add_argument("--grid", action="store_true", help="figure of images per class with heatmaps")
    ex.add_argument("--per-class", type=int, default=4, help="images per class in --grid (default: 4)")
    ex.add_argument("--compare", nargs="+", metavar="RUN", help="more runs shown side by side in --grid")
    ex.add_argument("--report", action="store_true",
                    help="measure centre energy share and the model-randomisation check over --split")
    ex.add_argument("--split", choices=("train", "val", "test"), default="test", help="default: %(default)s")
    ex.add_argument("--limit", type=int, default=None, help="use a stratified subset of N images for --report")
    ex.add_argument("--randomisation-images", type=int, default=64,
                    help="images for the randomisation check (default: %(default)s)")
    ex.add_argument("--checkpoint", choices=("best", "last"), default="best", help="default: %(default)s")
    ex.set_defaults(func=cmd_explain)

    er = sub.add_parser("errors", help="galleries of right/wrong predictions and most-confused class pairs")
    er.add_argument("run_dir", help="a run folder made by 'bloodcell train'")
    er.add_argument("--split", choices=("train", "val", "test"), default="test", help="default: %(default)s")
    er.add_argument("--per-class", type=int, default=8, help="images per gallery row (default: 8)")
    er.add_argument("--out", help="output folder (default: RUN_DIR/errors_SPLIT)")
    er.add_argument("--checkpoint", choices=("best", "last"), default="best", help="default: %(default)s")
    er.set_defaults(func=cmd_errors)

    rv = sub.add_parser("review", help="rank likely mislabelled images (cleanlab on k-fold predictions)")
    _add_data_args(rv, default=None)
    rv.add_argument("--model", default="se-cnn", help="model trained per fold (default: %(default)s)")
    rv.add_argument("--model-arg", action="append", metavar="KEY=VALUE", help="override a model argument")
    rv.add_argument("--folds", type=int, default=5, help="cross-validation folds (default: 5)")
    rv.add_argument("--epochs", type=int, default=5, help="epochs per fold (default: 5)")
    rv.add_argument("--top", type=int, default=200, help="rows in the CSV besides flagged ones (default: 200)")
    rv.add_argument("--seed", type=int, default=0, help="seed of folds and training (default: 0)")
    rv.add_argument("--threads", type=int, default=None, help="CPU threads (default: all cores)")
    rv.add_argument("--out", help="output folder (default: runs/review_DATASIZE_MODEL)")
    rv.set_defaults(func=_require_data(cmd_review))

    au = data_sub.add_parser("audit", help="unreadable files, exact and near duplicates, label conflicts, leakage")
    au.add_argument("--source", help="folder with one sub-folder of images per class")
    au.add_argument("--split-file", help="with --source: CSV path,label,split to check leakage across splits")
    au.add_argument("--data", help="a prepared dataset's name or npz (audited at --size)")
    au.add_argument("--size", type=int, default=64, help="size of the prepared dataset (default: 64)")
    au.add_argument("--data-dir", default=None, help=DIR_HELP)
    au.add_argument("--threshold", type=int, default=10, help="near duplicate: at most N differing hash bits "
                    "(default: 10 of 256)")
    au.add_argument("--hash-size", type=int, default=16, help="dHash side, bits = side^2 (default: 16)")
    au.add_argument("--workers", type=int, default=1, help="decoding processes for --source (default: 1)")
    au.add_argument("--out", help="report folder (default: ./audit_SOURCE or beside the dataset)")
    au.set_defaults(func=cmd_data_audit)


def _require_data(func):
    def wrapped(a: argparse.Namespace) -> int:
        if not a.data:
            raise BloodcellError("give --data NAME (a prepared dataset) or an npz file")
        return func(a)
    return wrapped
