"""``bloodcell evaluate``: metrics of a run on a split, written beside it."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from bloodcell.commands.common import add_checkpoint_arg, add_device_arg, add_split_arg


def cmd_evaluate(a: argparse.Namespace) -> int:
    from bloodcell.evaluation.evaluate import evaluate_run, format_report

    m = evaluate_run(a.run_dir, a.split, a.checkpoint, speed=a.speed, device=a.device)
    if a.json:
        print(json.dumps(m, indent=2))
        return 0
    print(format_report(m, m["class_names"]))
    print(f"\nreport: {Path(a.run_dir) / 'metrics.json'}, {Path(a.run_dir) / f'confusion_{a.split}.png'}")
    return 0


def add_commands(sub) -> None:
    ev = sub.add_parser("evaluate", help="metrics and confusion matrix of a run (and, with --speed, its speed)",
                        description="Evaluate a run folder with one prediction pass over a split of its dataset: "
                                    "accuracy, weighted/macro precision, recall and F1, ROC AUC, per-class report, "
                                    "confusion matrix (CSV + PNG), parameters and size on disk. Results go to "
                                    "the run's metrics.json under the split's name.")
    ev.add_argument("run_dir", help="a run folder made by 'bloodcell train'")
    add_split_arg(ev)
    add_checkpoint_arg(ev, "evaluate")
    add_device_arg(ev)
    ev.add_argument("--json", action="store_true", help="print the metrics as JSON")
    ev.add_argument("--speed", action="store_true",
                    help="also measure inference throughput (batch 256) and latency (batch 1) on the device")
    ev.set_defaults(func=cmd_evaluate)
