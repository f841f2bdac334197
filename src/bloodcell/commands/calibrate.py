"""``bloodcell calibrate``: fit a run's trust settings on its validation split, stored beside its weights."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from bloodcell.choices import CONFORMAL_METHODS, OOD_METHODS, TTA
from bloodcell.commands.common import add_checkpoint_arg, add_device_arg


def probability(text: str) -> float:
    """A number strictly between 0 and 1, or the argparse error saying so."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number between 0 and 1, got '{text}'") from None
    if not 0 < value < 1:
        raise argparse.ArgumentTypeError(f"must be between 0 and 1 (exclusive), got {text}")
    return value


def probability_or_bound(text: str) -> float:
    """A number from 0 to 1 inclusive (``predict --review-below``: 0 reviews nothing, 1 everything)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number between 0 and 1, got '{text}'") from None
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"must be between 0 and 1, got {text}")
    return value


def tta_list(text: str) -> tuple[str, ...]:
    names = tuple(t.strip() for t in text.split(",") if t.strip())
    bad = [t for t in names if t not in TTA]
    if bad or not names:
        raise argparse.ArgumentTypeError(f"expected a comma-separated list of {', '.join(TTA)}, got '{text}'")
    return names


def cmd_calibrate(a: argparse.Namespace) -> int:
    from bloodcell.evaluation.evaluate import calibrate_run, format_calibration

    c = calibrate_run(a.run_dir, a.checkpoint, a.device, modes=a.tta, target_accuracy=a.target_accuracy,
                      ood_rate=a.ood_rate, ood_method=a.ood_method, conformal_method=a.conformal_method)
    if a.json:
        print(json.dumps(c, indent=2))
        return 0
    print(format_calibration(c))
    print(f"\nwrote {Path(a.run_dir) / 'calibration.json'} (+ calibration.safetensors); evaluate, predict and "
          "export now use it")
    return 0


def add_commands(sub) -> None:
    ca = sub.add_parser("calibrate", help="fit temperature, review and OOD thresholds and conformal sets on validation",
                        description="Fit, on the run's validation split, what makes its predictions say how far "
                        "they can be trusted: temperature scaling (by NLL), the confidence threshold under which a "
                        "prediction goes to review (the lowest reaching --target-accuracy on validation), the "
                        "out-of-distribution score's threshold (flagging --ood-rate of the real validation cells; "
                        "feature statistics from the training split) and the conformal scores for prediction sets "
                        "at any alpha. One set per TTA setting. Written to calibration.json and "
                        "calibration.safetensors beside the weights; evaluate, predict and export use them.")
    ca.add_argument("run_dir", help="a run folder made by 'bloodcell train'")
    add_checkpoint_arg(ca, "calibrate")
    add_device_arg(ca)
    ca.add_argument("--tta", type=tta_list, default=TTA, metavar="LIST",
                    help=f"TTA settings to calibrate, comma-separated from {', '.join(TTA)} (default: all)")
    ca.add_argument("--target-accuracy", type=probability, default=0.995, metavar="A",
                    help="accuracy the accepted predictions should reach; sets the default review threshold "
                         "(default: %(default)s)")
    ca.add_argument("--ood-rate", type=probability, default=0.01, metavar="R",
                    help="share of real validation cells the OOD threshold flags (default: %(default)s)")
    ca.add_argument("--ood-method", choices=OOD_METHODS, default=None,
                    help="out-of-distribution score (default: mahalanobis on the penultimate features, the best "
                         "measured in docs/trust.md; energy for models whose penultimate layer is too wide)")
    ca.add_argument("--conformal-method", choices=CONFORMAL_METHODS, default=None,
                    help="conformal nonconformity score: lac = 1 - p (smallest sets), aps = adaptive prediction sets "
                         "(default: lac)")
    ca.add_argument("--json", action="store_true", help="print calibration.json")
    ca.set_defaults(func=cmd_calibrate)
