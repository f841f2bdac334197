"""The ``bloodcell`` command line: a thin layer over the package's functions."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from bloodcell import __version__
from bloodcell.errors import BloodcellError
from bloodcell.io import markdown_table

DATA_HELP = "a prepared dataset's name, or a MedMNIST-format .npz file (default: %(default)s)"
PRECISIONS = ("fp32", "bf16")  # as training.config.PRECISIONS, kept here so --help does not import torch
PRECISION_HELP = ("'bf16': train under CPU bf16 autocast (weights stay fp32; validation and tests run in fp32), "
                  "about 3x faster for large models on CPUs with AMX or AVX-512 BF16 and much slower on CPUs "
                  "without them; see benchmarks/model_throughput.py (default: %(default)s)")
DIR_HELP = "folder of prepared datasets (default: $BLOODCELL_DATA_DIR, else the user cache folder)"


def _add_data_args(p: argparse.ArgumentParser, default: str | None = "bloodmnist") -> None:
    p.add_argument("--data", default=default, help=DATA_HELP)
    p.add_argument("--size", type=int, default=64, choices=(28, 64, 128, 224),
                   help="image size in pixels (default: %(default)s)")
    p.add_argument("--data-dir", default=None, help=DIR_HELP)


def _text_table(header: list[str], rows: list[list]) -> str:
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
    fmt = "  ".join(f"{{:>{w}}}" if i else f"{{:<{w}}}" for i, w in enumerate(widths))
    return "\n".join(fmt.format(*map(str, r)) for r in [header, *rows])


# ---------------------------------------------------------------- data
def cmd_data_prepare(a: argparse.Namespace) -> int:
    from bloodcell.data import sources

    chosen = [x for x in (a.source, a.npz, a.download) if x]
    if len(chosen) != 1:
        raise BloodcellError("give exactly one of --source DIR, --npz FILE or --download")
    if a.source:
        info = sources.prepare_from_folder(a.source, a.size, a.crop, a.split_file, a.name, a.seed, a.data_dir,
                                           force=a.force, workers=a.workers, progress=sys.stderr.isatty(),
                                           corrections=a.corrections)
    elif a.npz:
        info = sources.prepare_from_npz(a.npz, a.name, a.size, a.data_dir, corrections=a.corrections)
    else:
        if a.corrections:
            raise BloodcellError("--corrections applies to --source or --npz; download first, then prepare --npz")
        info = sources.download_bloodmnist(a.size, a.data_dir)
    state = "up to date (inputs unchanged), reused" if info.get("reused") else "prepared"
    print(f"dataset '{info['name']}' at {info['size']}px {state}: {info['npz']}")
    counts = info["counts"]
    print("  " + ", ".join(f"{s} {sum(c)}" for s, c in counts.items()) + f" images, {len(info['class_names'])} classes")
    if info.get("decode_seconds") is not None and not info.get("reused"):
        print(f"  decoded in {info['decode_seconds']:.1f}s")
    if info.get("corrections"):
        c = info["corrections"]
        print(f"  corrections from {c.get('file')}: {c.get('relabelled')} relabelled, {c.get('dropped')} dropped")
    skipped = info.get("skipped", [])
    if skipped:
        print(f"  skipped {len(skipped)} file(s) that could not be decoded:")
        for s in skipped:
            print(f"    {s['path']}: {s['reason']}")
    return 0


def cmd_data_list(a: argparse.Namespace) -> int:
    from bloodcell.data.store import data_dir, list_datasets

    rows = list_datasets(a.data_dir)
    if not rows:
        print(f"no prepared datasets in {data_dir(a.data_dir)}")
        return 0
    header = ["name", "size", "classes", "train", "val", "test", "source", "path"]
    print(_text_table(header, [[r[h] for h in header] for r in rows]))
    return 0


def cmd_data_info(a: argparse.Namespace) -> int:
    from bloodcell.data.store import SPLITS, load_dataset
    from bloodcell.evaluation.plots import class_counts_png, sample_grid_png
    from bloodcell.io import write_text

    d = load_dataset(a.data, a.size, a.data_dir)
    name = d.meta.get("name", a.data)
    out = Path(a.out) if a.out else d.path.parent / f"{Path(d.path).stem}_info"
    counts = d.counts()
    header = ["split", *d.class_names, "total"]
    rows = [[s, *counts[s], sum(counts[s])] for s in SPLITS]
    rows.append(["all", *[sum(counts[s][i] for s in SPLITS) for i in range(d.num_classes)],
                 sum(sum(c) for c in counts.values())])
    print(f"dataset '{name}', {d.size}x{d.size} px, {d.path}")
    print(_text_table(header, rows))
    md = f"# {name} ({d.size}x{d.size})\n\n" + markdown_table(header, rows) + "\n"
    write_text(out / "counts.md", md)
    class_counts_png(counts, d.class_names, out / "class_distribution.png", f"{name} {d.size}px: images per class")
    sample_grid_png(d.images["train"], d.labels["train"], d.class_names, out / "samples.png",
                    per_class=a.per_class, title=f"{name} {d.size}px, training images")
    print(f"wrote {out / 'counts.md'}, {out / 'class_distribution.png'}, {out / 'samples.png'}")
    return 0


# ---------------------------------------------------------------- models
def cmd_models(a: argparse.Namespace) -> int:
    import re

    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from bloodcell.models import count_params_keras, count_params_trainable, create_model, list_models

    def natural(spec) -> list:  # cnn-t2-2 before cnn-t2-10
        return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", spec.name)]

    rows = []
    for spec in sorted(list_models(), key=natural):
        m = create_model(spec.name, input_size=64).eval()
        counter = FlopCounterMode(display=False)
        with counter, torch.no_grad():
            m(torch.zeros(1, 3, 64, 64))
        rows.append({"name": spec.name, "family": spec.family, "params_keras": count_params_keras(m),
                     "params_trainable": count_params_trainable(m),
                     "mflops_64": round(counter.get_total_flops() / 1e6, 1),  # FLOPs = 2 x multiply-adds
                     "optimizer": spec.optimizer,
                     "input_sizes": list(spec.input_sizes) if spec.input_sizes else None,
                     "description": spec.description})
    if a.json:
        print(json.dumps(rows, indent=2))
        return 0
    header = ["name", "family", "params (Keras)", "trainable", "MFLOPs@64", "optimizer", "description"]
    print(_text_table(header, [[r["name"], r["family"], f"{r['params_keras']:,}", f"{r['params_trainable']:,}",
                                f"{r['mflops_64']:,.1f}", r["optimizer"], r["description"]] for r in rows]))
    print("MFLOPs: forward pass of one 64x64 image, counted by torch FlopCounterMode (1 multiply-add = 2 FLOPs).")
    return 0


# ---------------------------------------------------------------- train / evaluate / predict
def _parse_model_args(items: list[str]) -> dict:
    out = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise BloodcellError(f"--model-arg '{item}' is not KEY=VALUE")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


def cmd_train(a: argparse.Namespace) -> int:
    from bloodcell.training import TrainConfig, train

    cfg = TrainConfig(
        model=a.model, model_args=_parse_model_args(a.model_arg), data=a.data, size=a.size, data_dir=a.data_dir,
        epochs=a.epochs or 20, batch_size=a.batch_size,
        seed=a.seed, optimizer=a.optimizer, lr=a.lr, momentum=a.momentum, weight_decay=a.weight_decay,
        schedule=a.schedule, normalize=a.normalize, augment=a.augment, label_smoothing=a.label_smoothing,
        train_limit=a.train_limit, threads=a.threads, balance=a.balance, precision=a.precision,
    ).validate()
    data_tag = Path(a.data).stem if a.data.endswith(".npz") else a.data
    out = Path(a.out) if a.out else Path("runs") / f"{a.model}_{data_tag}{a.size}_seed{a.seed}"
    try:
        summary = train(cfg, out, resume=a.resume, progress=sys.stderr.isatty(),
                        extend_to=a.epochs if a.resume else None)
    except KeyboardInterrupt:
        print(f"\ninterrupted: the last finished epoch is saved in {out}; continue with "
              f"'bloodcell train --resume --out {out}'", file=sys.stderr)
        return 130
    print(f"trained {summary['epochs']} epochs in {summary['total_seconds']:.0f}s "
          f"(first epoch {summary['first_epoch_seconds']:.1f}s); best val_acc {summary['best_val_acc']:.4f} "
          f"at epoch {summary['best_epoch']}")
    print(f"run folder: {out}")
    if a.evaluate:
        return cmd_evaluate(argparse.Namespace(run_dir=str(out), split="test", checkpoint=a.checkpoint,
                                               json=False, no_speed=False))
    return 0


def cmd_evaluate(a: argparse.Namespace) -> int:
    from bloodcell.evaluation.evaluate import evaluate_run, format_report

    m = evaluate_run(a.run_dir, a.split, a.checkpoint, speed=not a.no_speed)
    if a.json:
        print(json.dumps(m, indent=2))
        return 0
    print(format_report(m, m["class_names"]))
    print(f"\nreport: {Path(a.run_dir) / 'metrics.json'}, {Path(a.run_dir) / f'confusion_{a.split}.png'}")
    return 0


def cmd_predict(a: argparse.Namespace) -> int:
    from bloodcell.io import csv_text, write_json, write_text
    from bloodcell.predict import Predictor

    pred = Predictor(a.run_dir, a.checkpoint)
    results = pred.predict_files(a.paths, top_k=a.top_k)
    if not results:
        raise BloodcellError("no image files found in the given paths")
    good = 0
    for r in results:
        if r.error:
            print(f"{r.path}\tERROR: {r.error}")
        else:
            good += 1
            alts = ", ".join(f"{c} {p:.3f}" for c, p in r.top[1:])
            print(f"{r.path}\t{r.top[0][0]}\t{r.top[0][1]:.4f}" + (f"\t({alts})" if alts else ""))
    if a.out:
        out = Path(a.out)
        if out.suffix == ".json":
            write_json(out, [{"path": r.path, "error": r.error,
                              "top": [{"class": c, "probability": p} for c, p in (r.top or [])]} for r in results])
        else:
            k = max((len(r.top) for r in results if r.top), default=0)
            header = ["path", "error", *[f"{x}{i + 1}" for i in range(k) for x in ("class", "prob")]]
            write_text(out, csv_text(header, ([r.path, r.error or "", *[v for c, p in (r.top or [])
                                                                      for v in (c, f"{p:.6f}")]] for r in results)))
        print(f"wrote {out}")
    print(f"classified {good} of {len(results)} file(s)", file=sys.stderr)
    return 0 if good else 1


# ---------------------------------------------------------------- parser
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="bloodcell",
        description="Train, evaluate and use efficient classifiers for microscope images of blood cells.",
    )
    p.add_argument("--version", action="version", version=f"bloodcell {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", required=True)

    data = sub.add_parser("data", help="prepare, list and inspect datasets")
    dsub = data.add_subparsers(dest="data_command", metavar="ACTION", required=True)
    pr = dsub.add_parser(
        "prepare", help="import images into a cached MedMNIST-format dataset",
        description="Import a folder-per-class tree (the PBC layout), an official BloodMNIST npz, or download "
        "BloodMNIST, applying the MedMNIST recipe (centred crop, antialiased bicubic resize). The result is "
        "cached; the same inputs reuse the cache, changed inputs or recipe rebuild it.")
    pr.add_argument("--source", help="folder with one sub-folder of images per class")
    pr.add_argument("--npz", help="an official bloodmnist*.npz (or any MedMNIST-format npz with 8 classes)")
    pr.add_argument("--download", action="store_true", help="fetch BloodMNIST at --size via the medmnist package")
    pr.add_argument("--split-file", help="CSV with columns path,label,split (paths relative to --source); "
                    "without it: a seeded stratified 70/10/20 split")
    pr.add_argument("--size", type=int, default=64, choices=(28, 64, 128, 224),
                    help="output size in pixels (default: %(default)s)")
    pr.add_argument("--crop", type=int, default=200, help="centred square crop before resizing (default: 200)")
    pr.add_argument("--name", help="dataset name (default: the source folder's name; 'bloodmnist' for --npz)")
    pr.add_argument("--seed", type=int, default=0, help="seed of the stratified split (default: 0)")
    pr.add_argument("--workers", type=int, default=None, help="decoding processes (default: all cores)")
    pr.add_argument("--corrections", help="reviewed CSV from 'bloodcell review' (action keep/relabel/drop, "
                    "new_label), applied and recorded with its hash in the dataset metadata")
    pr.add_argument("--force", action="store_true", help="rebuild even if the cache is up to date")
    pr.add_argument("--data-dir", default=None, help=DIR_HELP)
    pr.set_defaults(func=cmd_data_prepare)

    ls = dsub.add_parser("list", help="show the prepared datasets")
    ls.add_argument("--data-dir", default=None, help=DIR_HELP)
    ls.set_defaults(func=cmd_data_list)

    inf = dsub.add_parser("info", help="per-split, per-class counts, a class distribution chart and sample grid")
    _add_data_args(inf)
    inf.add_argument("--out", help="folder for counts.md and the PNGs (default: beside the dataset)")
    inf.add_argument("--per-class", type=int, default=6, help="images per class in the sample grid (default: 6)")
    inf.set_defaults(func=cmd_data_info)

    mo = sub.add_parser("models", help="list the registered models with parameter counts")
    mo.add_argument("--json", action="store_true", help="print JSON for scripts")
    mo.set_defaults(func=cmd_models)

    tr = sub.add_parser(
        "train", help="train a model into a run folder",
        description="Train a registered model. The run folder gets config.json, history.csv, best and last "
        "weights (safetensors), state.pt for --resume, and metrics.json.")
    tr.add_argument("--model", default="se-cnn", help="registered model name, see 'bloodcell models' "
                    "(default: %(default)s)")
    tr.add_argument("--model-arg", action="append", metavar="KEY=VALUE",
                    help="override a model argument, e.g. bn_momentum=0.1 or dropout=0.3 (repeatable)")
    _add_data_args(tr)
    tr.add_argument("--epochs", type=int, default=None,
                    help="epochs (default: 20; with --resume: the run's own count, or more to extend it)")
    tr.add_argument("--batch-size", type=int, default=64, help="batch size (default: %(default)s)")
    tr.add_argument("--seed", type=int, default=0, help="seed for initialisation, shuffling, augmentation")
    tr.add_argument("--optimizer", choices=("adam", "adamw", "sgd"), default=None,
                    help="default: the paper's choice for the model (Adam; plain SGD for Inception and ResNet)")
    tr.add_argument("--lr", type=float, default=1e-3, help="base learning rate (default: %(default)s)")
    tr.add_argument("--momentum", type=float, default=0.0, help="SGD momentum (default: 0, as in the paper)")
    tr.add_argument("--weight-decay", type=float, default=0.0, help="weight decay (default: 0)")
    tr.add_argument("--schedule", choices=("paper", "exp", "cosine", "constant"), default="cosine",
                    help="learning-rate schedule per epoch: 'paper' = the compounding decay the paper's code ran, "
                    "lr*exp(-0.05 e(e+1)); 'exp' = the intended lr*exp(-0.1 e); 'cosine' = half cosine to 0; "
                    "'constant' (default: %(default)s)")
    tr.add_argument("--augment", choices=("none", "flip", "dihedral"), default="dihedral",
                    help="batch augmentation: random flips, or all 8 flips/90-degree turns (default: %(default)s)")
    tr.add_argument("--balance", choices=("none", "augment", "smote", "class-weight"), default="none",
                    help="class balancing of the training split: oversample minority classes to the majority count "
                    "by augmentation (flips, rotation, shift, zoom, drawn from all their images) or SMOTE, or "
                    "weigh the loss by inverse class frequency (default: %(default)s)")
    tr.add_argument("--normalize", action="store_true",
                    help="standardise by the training set's channel mean/std (default: only divide by 255)")
    tr.add_argument("--label-smoothing", type=float, default=0.0, help="label smoothing (default: 0)")
    tr.add_argument("--train-limit", type=int, default=None,
                    help="train on a stratified subset of this many images (for quick checks)")
    tr.add_argument("--threads", type=int, default=None, help="CPU threads (default: all cores)")
    tr.add_argument("--precision", choices=PRECISIONS, default="fp32", help=PRECISION_HELP)
    tr.add_argument("--out", help="run folder (default: runs/MODEL_DATASIZE_seedSEED)")
    tr.add_argument("--resume", action="store_true",
                    help="continue the run in --out where it stopped: after its last epoch, or inside an epoch "
                         "from the state saved every 5 min (its saved config is used)")
    tr.add_argument("--evaluate", action="store_true", help="evaluate on the test split when training ends")
    tr.add_argument("--checkpoint", choices=("best", "last"), default="best",
                    help="checkpoint that --evaluate uses (default: %(default)s)")
    tr.set_defaults(func=cmd_train)

    ev = sub.add_parser("evaluate", help="metrics, confusion matrix, size and CPU speed of a run",
                        description="Evaluate a run folder with one prediction pass; results go to metrics.json.")
    ev.add_argument("run_dir", help="a run folder made by 'bloodcell train'")
    ev.add_argument("--split", choices=("train", "val", "test"), default="test", help="default: %(default)s")
    ev.add_argument("--checkpoint", choices=("best", "last"), default="best",
                    help="best-by-validation or last epoch's weights (default: %(default)s)")
    ev.add_argument("--json", action="store_true", help="print the metrics as JSON")
    ev.add_argument("--no-speed", action="store_true", help="skip the CPU throughput/latency measurement")
    ev.set_defaults(func=cmd_evaluate)

    pd = sub.add_parser("predict", help="classify image files or folders with a trained run",
                        description="Classify JPEG/PNG/TIFF/BMP files of any size and mode with exactly the "
                        "preprocessing the model was trained with. Bad files are reported and skipped; the exit "
                        "status is non-zero only if no file could be classified.")
    pd.add_argument("run_dir", help="a run folder (or a .safetensors weights file)")
    pd.add_argument("paths", nargs="+", metavar="PATH", help="image files or folders (searched recursively)")
    pd.add_argument("--top-k", type=int, default=3, help="classes to show per file (default: %(default)s)")
    pd.add_argument("--out", help="also write the results to FILE.csv or FILE.json")
    pd.add_argument("--checkpoint", choices=("best", "last"), default="best", help="default: %(default)s")
    pd.set_defaults(func=cmd_predict)

    for register in _command_modules():
        register(sub, dsub)
    return p


def _command_modules() -> list:
    """Commands that live beside their feature: each module has ``add_commands(sub, data_sub)``.

    A feature folder (e.g. ``explain/``) adds its sub-commands here instead of growing this file.
    """
    import importlib

    names: list[str] = ["bloodcell.explain.commands", "bloodcell.evaluation.commands"]
    return [importlib.import_module(n).add_commands for n in names]


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except BloodcellError as e:
        print(f"bloodcell: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\nbloodcell: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 0
