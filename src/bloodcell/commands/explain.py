"""``bloodcell explain``, ``errors`` and ``review``: looking inside a run and its data."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from bloodcell.commands.common import (
    add_checkpoint_arg,
    add_data_args,
    add_device_arg,
    add_max_pixels_arg,
    add_split_arg,
    add_threads_arg,
    apply_max_pixels,
    parse_model_args,
    positive_int,
)
from bloodcell.errors import BloodcellError


def cmd_explain(a: argparse.Namespace) -> int:
    from bloodcell.explain import runs

    apply_max_pixels(a)
    if a.list_layers:
        return _list_layers(a)
    if not (a.paths or a.grid or a.report):
        raise BloodcellError("give image PATHs, --grid or --report (or --list-layers)")
    if a.report:
        runs.refuse_ensemble(a.run_dir, "--report")
    if a.out and Path(a.out).exists() and not Path(a.out).is_dir():
        raise BloodcellError(f"--out {a.out}: exists and is not a folder (--out names a folder for the PNGs)")
    status = 0
    if a.paths:
        results = runs.explain_files(a.run_dir, a.paths, a.layer, a.target, a.out, a.checkpoint, device=a.device)
        for r in results:
            line = (f"{r['path']}\tERROR: {r['error']}" if "error" in r else
                    f"{r['path']}\t{r['class']}\t{r['probability']:.4f}\t{r['png']}"
                    + "".join(f"\tWARNING: {w}" for w in r.get("warnings", [])))
            print(f"{r['member']}\t{line}" if "member" in r else line)  # an ensemble's: one line per member
        good = len({r["path"] for r in results if "error" not in r})
        print(f"explained {good} of {len({r['path'] for r in results})} file(s)", file=sys.stderr)
        status = 0 if good else 1  # the rule of predict: 1 only when no file could be read
    if a.grid:
        png = runs.grid([a.run_dir, *(a.compare or [])], a.split, a.per_class, a.layer, a.out, a.checkpoint,
                        device=a.device)
        print(f"wrote {png}")
    if a.report:
        r = runs.report(a.run_dir, a.split, a.limit, a.layer, a.randomisation_images, a.checkpoint, device=a.device)
        print(runs.format_report(r))
        print(f"wrote {Path(a.run_dir) / 'explain' / 'gradcam_report.json'}, "
              f"{Path(a.run_dir) / 'explain' / 'gradcam_centre_share.png'}")
    return status


def _list_layers(a: argparse.Namespace) -> int:
    from bloodcell.explain.gradcam import default_layer, spatial_layers
    from bloodcell.explain.runs import refuse_ensemble
    from bloodcell.inference import Classifier

    refuse_ensemble(a.run_dir, "--list-layers")
    clf = Classifier.from_run(a.run_dir, a.checkpoint, device=a.device)
    layers = spatial_layers(clf.model, clf.input_size)
    default = default_layer(clf.model, layers)
    for x in layers:
        mark = "  (default)" if x.name == default else ""
        print(f"{x.name:<40}{x.type:<20}{'x'.join(map(str, x.shape))}{mark}")
    return 0


def cmd_errors(a: argparse.Namespace) -> int:
    from bloodcell.explain.errors import error_analysis

    r = error_analysis(a.run_dir, a.split, a.per_class, a.out, a.checkpoint, device=a.device)
    print(f"{r['n']} images, accuracy {r['accuracy']:.4f}, {r['errors']} errors")
    for p in r["pairs"][:10]:
        print(f"  {p['true']:>14} -> {p['predicted']:<14}{p['count']:>5}  ({p['share_of_true']:.1%} of {p['true']})")
    print("wrote " + ", ".join(r["files"].values()))
    return 0


def cmd_review(a: argparse.Namespace) -> int:
    from bloodcell.explain.review import review_dataset

    if not a.data:
        raise BloodcellError("give --data NAME (a prepared dataset) or an npz file")
    if a.folds < 2:
        raise BloodcellError(f"--folds must be at least 2 (each image is predicted by a model that did not see it), "
                             f"not {a.folds}")
    r = review_dataset(a.data, size=a.size, model=a.model, folds=a.folds, epochs=a.epochs, out=a.out,
                       data_dir=a.data_dir, top=a.top, seed=a.seed, threads=a.threads,
                       model_args=parse_model_args(a.model_arg), device=a.device)
    print(f"{r['images']} train+val images, cross-validated accuracy {r['cv_accuracy']:.4f}, "
          f"{r['flagged']} flagged by cleanlab")
    for row in r["rows"][:10]:
        print(f"  {row['rank']:>4} {row['split']}#{row['index']:<6} {row['given_label']:>14} -> "
              f"{row['suggested_label']:<14} {row['score']:.4f}  {row['path']}")
    print(f"wrote {r['csv']} (edit 'action': keep/relabel/drop and 'new_label'), {r['gallery']}")
    return 0


def add_commands(sub) -> None:
    ex = sub.add_parser("explain", help="Grad-CAM heatmaps of a run, per-class grids and a measured report",
                        description="Grad-CAM (captum LayerGradCam) on the last spatial layer by default: an "
                                    "overlay PNG per image file, a per-class grid of a split (several runs side by "
                                    "side with --compare), or a report measuring how much of the heatmap falls on "
                                    "the cell and whether it depends on the trained weights. The exit status is 1 "
                                    "when no given file could be read, as for predict.")
    ex.add_argument("run_dir", help="a run folder made by 'bloodcell train' (or a .safetensors file for PATHs); an "
                    "ensemble folder explains each member: PATHs into OUT/MEMBER, --grid with the members side by side")
    ex.add_argument("paths", nargs="*", metavar="PATH", help="image files or folders to explain")
    ex.add_argument("--layer", help="target layer name (see --list-layers; default: last spatial layer)")
    ex.add_argument("--class", dest="target", help="explain this class instead of the predicted one")
    ex.add_argument("--out", help="output folder (default: RUN_DIR/explain)")
    ex.add_argument("--list-layers", action="store_true", help="list the layers Grad-CAM can use")
    ex.add_argument("--grid", action="store_true", help="figure of images per class with heatmaps")
    ex.add_argument("--per-class", type=positive_int, default=4,
                    help="images per class in --grid (default: %(default)s)")
    ex.add_argument("--compare", nargs="+", metavar="RUN", help="more runs shown side by side in --grid")
    ex.add_argument("--report", action="store_true",
                    help="measure centre energy share and the model-randomisation check over --split")
    add_split_arg(ex, "draw --grid and --report from")
    ex.add_argument("--limit", type=positive_int, default=None,
                    help="use a stratified subset of N images for --report")
    ex.add_argument("--randomisation-images", type=positive_int, default=64,
                    help="images for the randomisation check (default: %(default)s)")
    add_checkpoint_arg(ex, "explain")
    add_device_arg(ex)
    add_max_pixels_arg(ex)
    ex.set_defaults(func=cmd_explain)

    er = sub.add_parser("errors", help="galleries of right/wrong predictions and most-confused class pairs",
                        description="One prediction pass over a split: galleries of the most confident right and "
                                    "wrong predictions per class, the most-confused class pairs with example "
                                    "images (PNG), and the pairs as CSV and markdown.")
    er.add_argument("run_dir", help="a run folder made by 'bloodcell train'")
    add_split_arg(er, "analyse")
    er.add_argument("--per-class", type=positive_int, default=8, help="images per gallery row (default: %(default)s)")
    er.add_argument("--out", help="output folder (default: RUN_DIR/errors_SPLIT)")
    add_checkpoint_arg(er, "analyse")
    add_device_arg(er)
    er.set_defaults(func=cmd_errors)

    rv = sub.add_parser("review", help="rank likely mislabelled images (cleanlab on k-fold predictions)",
                        description="Train one model per fold on train+val (k-fold, the recommended recipe), "
                                    "predict each fold's held-out images, and rank every image by cleanlab's "
                                    "label quality. Writes label_review.csv (edit 'action' and 'new_label', then "
                                    "'bloodcell data prepare --corrections') and a gallery of the suspects.")
    add_data_args(rv, default=None)
    rv.add_argument("--model", default="se-cnn", help="model trained per fold (default: %(default)s)")
    rv.add_argument("--model-arg", action="append", metavar="KEY=VALUE", help="override a model argument")
    rv.add_argument("--folds", type=positive_int, default=5, help="cross-validation folds (default: %(default)s)")
    rv.add_argument("--epochs", type=positive_int, default=5, help="epochs per fold (default: %(default)s)")
    rv.add_argument("--top", type=positive_int, default=200,
                    help="rows in the CSV besides flagged ones (default: %(default)s)")
    rv.add_argument("--seed", type=int, default=0, help="seed of folds and training (default: %(default)s)")
    add_threads_arg(rv)
    add_device_arg(rv)
    rv.add_argument("--out", help="output folder (default: runs/review_DATASIZE_MODEL)")
    rv.set_defaults(func=cmd_review)
