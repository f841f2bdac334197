"""``bloodcell tune``: an Optuna sweep over the training recipe, each trial an ordinary run folder."""

from __future__ import annotations

import argparse
from pathlib import Path

from bloodcell.choices import AUGMENTS, BALANCES, OPTIMIZERS, PRUNERS, RECIPES, SCHEDULES
from bloodcell.commands.common import (
    add_data_args,
    add_device_arg,
    add_precision_arg,
    add_threads_arg,
    non_negative_float,
    non_negative_int,
    parse_model_args,
    positive_float,
    positive_int,
)
from bloodcell.errors import BloodcellError

FIXED_OPTIONS = ("epochs", "batch_size", "optimizer", "lr", "weight_decay", "augment", "label_smoothing", "balance",
                 "schedule")


def cmd_tune(a: argparse.Namespace) -> int:
    from bloodcell.training import preset_config
    from bloodcell.tuning import StudyConfig, load_space, run_study, summarize_study

    space = load_space(a.space)
    given = {k: getattr(a, k) for k in FIXED_OPTIONS if getattr(a, k, None) is not None}
    both = sorted(set(given) & set(space))
    if both:
        raise BloodcellError(f"--{both[0].replace('_', '-')} is both fixed on the command line and searched by the "
                             "space; drop one")
    base = preset_config(a.recipe, model=a.model, model_args=parse_model_args(a.model_arg), data=a.data,
                         size=a.size, data_dir=a.data_dir, seed=a.seed, train_limit=a.train_limit,
                         threads=a.threads, precision=a.precision, device=a.device, **given)
    out = Path(a.out) if a.out else Path("runs") / "tune" / a.study
    cfg = StudyConfig(base=base, study=a.study, out=out, trials=a.trials, storage=a.storage, space=space,
                      pruner=a.pruner, sampler_seed=a.seed)
    print(f"study '{a.study}' in {_shown(cfg)}: {a.trials} finished trials wanted; run folders in {out}/trial-NNNN")
    try:
        study = run_study(cfg)
    except KeyboardInterrupt:
        print("\ninterrupted: finished trials are kept in the study; run the same command to go on", flush=True)
        return 130
    summary = summarize_study(study, out)
    best = summary["best"][0] if summary["best"] else None
    counts = ", ".join(f"{n} {s}" for s, n in summary["trials"].items() if n)
    print(f"trials: {counts}")
    if best:
        print(f"best: trial {best['number']}, val_acc {best['value']:.4f} ({best['run_dir']})")
        print(f"re-run it: bloodcell train --config {summary['best_config']} --out runs/best")
    print(f"summary: {out / 'summary.md'}")
    return 0


def _shown(cfg) -> str:
    from bloodcell.tuning.study import hide_password

    return hide_password(cfg.storage_url())


def add_commands(sub) -> None:
    tu = sub.add_parser(
        "tune", help="sweep training settings with Optuna (TPE, pruning, SQLite or PostgreSQL)",
        description="Search training settings with an Optuna study: the TPE sampler draws each trial's settings "
        "from the search space, the trial trains into its own run folder OUT/trial-NNNN (its config.json re-runs "
        "it with 'bloodcell train --config'), and validation accuracy after each epoch lets the pruner stop poor "
        "trials early. The study is kept in --storage, so an interrupted sweep goes on where it stopped and the "
        "same command on several machines joins one study (use a PostgreSQL URL for that). At the end OUT holds "
        "summary.md/json (best trials, parameter importances), best_config.json and Optuna's plots.")
    tu.add_argument("--model", default="se-cnn", help="registered model name (default: %(default)s)")
    tu.add_argument("--model-arg", action="append", metavar="KEY=VALUE",
                    help="a fixed argument of the model's builder (repeatable); search one with model_args.KEY in "
                         "the space")
    add_data_args(tu)
    tu.add_argument("--trials", type=non_negative_int, default=20,
                    help="finished (complete or pruned) trials the study should hold; a worker stops when it does, "
                         "so several workers share the count; 0 only writes the summary (default: %(default)s)")
    tu.add_argument("--study", default="bloodcell", help="study name within the storage (default: %(default)s)")
    tu.add_argument("--storage", default=None, metavar="URL",
                    help="an SQLAlchemy URL for Optuna's storage, e.g. postgresql+psycopg2://user:pass@host/db "
                         "(needs 'bloodcell[postgres]'); default: sqlite:///OUT/study.db (one machine)")
    tu.add_argument("--space", default=None, metavar="FILE",
                    help="search space as JSON: {\"lr\": {\"type\": \"float\", \"low\": 1e-4, \"high\": 1e-2, "
                         "\"log\": true}, \"batch_size\": {\"type\": \"categorical\", \"choices\": [32, 64]}, ...}; "
                         "names are training-config fields or model_args.KEY (default: lr, weight_decay, "
                         "batch_size, label_smoothing, augment)")
    tu.add_argument("--pruner", choices=PRUNERS, default="median",
                    help="stop a trial early by its validation accuracy per epoch: 'median' of earlier trials at "
                         "the same epoch, or 'hyperband' (default: %(default)s)")
    tu.add_argument("--recipe", choices=RECIPES, default="recommended",
                    help="the settings a trial does not search (default: %(default)s)")
    tu.add_argument("--epochs", type=positive_int, default=None, help="epochs per trial (default: the recipe's)")
    tu.add_argument("--batch-size", type=positive_int, default=None, help="a fixed batch size (not searched)")
    for option, kind in (("--optimizer", OPTIMIZERS), ("--lr", positive_float), ("--weight-decay", non_negative_float),
                         ("--schedule", SCHEDULES), ("--augment", AUGMENTS), ("--label-smoothing", non_negative_float),
                         ("--balance", BALANCES)):
        typed = {"choices": kind} if isinstance(kind, tuple) else {"type": kind}
        tu.add_argument(option, default=None, **typed,
                        help="a fixed value for every trial (default: the recipe's; an error if the space searches it)")
    tu.add_argument("--seed", type=int, default=0,
                    help="training seed of every trial, and the sampler's seed (default: %(default)s)")
    tu.add_argument("--train-limit", type=positive_int, default=None,
                    help="train each trial on a stratified subset of this many images")
    add_threads_arg(tu)
    add_precision_arg(tu)
    add_device_arg(tu)
    tu.add_argument("--out", default=None, help="study folder: trial run folders, summary and plots "
                    "(default: runs/tune/STUDY)")
    tu.set_defaults(func=cmd_tune)


__all__ = ["add_commands", "cmd_tune"]
