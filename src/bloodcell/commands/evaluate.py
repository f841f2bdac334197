"""``bloodcell evaluate``: metrics of a run on a split, written beside it."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from bloodcell.choices import TTA
from bloodcell.commands.common import add_checkpoint_arg, add_device_arg, add_split_arg, positive_int


def cmd_evaluate(a: argparse.Namespace) -> int:
    from bloodcell.evaluation.evaluate import evaluate_run, format_report, metrics_key
    from bloodcell.io import json_safe

    tta = getattr(a, "tta", "none")  # 'train --evaluate' passes only the options it has
    corruptions = getattr(a, "corruptions", False)
    m = evaluate_run(a.run_dir, a.split, a.checkpoint, speed=a.speed, device=a.device, tta=tta,
                     corruptions=corruptions, corruption_images=getattr(a, "corruption_images", None))
    if a.json:
        print(json.dumps(json_safe(m), indent=2, allow_nan=False))
        return 0
    print(format_report(m, m["class_names"]))
    key, run = metrics_key(a.split, tta), Path(a.run_dir)
    figures = [f"confusion_{key}.png", f"reliability_{key}.png", f"risk_coverage_{key}.png"]
    figures += [f"corruptions_{key}.png"] if corruptions else []
    print(f"\nreport: {run / 'metrics.json'} (under \"{key}\"), " + ", ".join(str(run / f) for f in figures))
    return 0


def add_commands(sub) -> None:
    ev = sub.add_parser("evaluate", help="metrics and confusion matrix of a run (and, with --speed, its speed)",
                        description="Evaluate a run folder with one prediction pass over a split of its dataset: "
                                    "accuracy, weighted/macro precision, recall and F1, ROC AUC, per-class report, "
                                    "confusion matrix (CSV + PNG), parameters and size on disk, and how far the "
                                    "predictions can be trusted: ECE (15 bins), maximum calibration error, NLL "
                                    "and Brier score before and after temperature scaling (reliability diagram "
                                    "PNG), the risk-coverage curve (PNG) and its area, and, once 'bloodcell "
                                    "calibrate' has run, the coverage and accuracy at the validation thresholds "
                                    "for target accuracies, conformal coverage and set size, and the share flagged "
                                    "out-of-distribution. Results go to the run's metrics.json under the split's "
                                    "name (SPLIT_tta_MODE with --tta).")
    ev.add_argument("run_dir", help="a run folder made by 'bloodcell train'")
    add_split_arg(ev)
    add_checkpoint_arg(ev, "evaluate")
    add_device_arg(ev)
    ev.add_argument("--json", action="store_true", help="print the metrics as JSON")
    ev.add_argument("--speed", action="store_true",
                    help="also measure inference throughput (batch 256) and latency (batch 1) on the device")
    ev.add_argument("--tta", choices=TTA, default="none",
                    help="test-time augmentation: average the probabilities over flips (4 views) or the 8 "
                         "symmetries of the square, in one batched forward pass (default: %(default)s)")
    ev.add_argument("--corruptions", action="store_true",
                    help="also measure accuracy, OOD flags and review under 13 image corruptions (blur, noise, "
                         "brightness, contrast, hue, saturation, JPEG, rotation, zoom) at 5 severities each")
    ev.add_argument("--corruption-images", type=positive_int, default=None, metavar="N",
                    help="with --corruptions, use N images of the split (stratified) instead of all")
    ev.set_defaults(func=cmd_evaluate)
