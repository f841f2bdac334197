"""``bloodcell ensemble``: finished runs voting as one model, in a folder every predicting command accepts."""

from __future__ import annotations

import argparse
from pathlib import Path

from bloodcell.choices import VOTES
from bloodcell.commands.common import add_checkpoint_arg, add_device_arg

VOTE_HELP = ("'soft': the mean of the members' softmax probabilities; 'majority': the class most members predict, "
             "ties broken by the soft mean, and as probabilities (votes + soft mean) / (members + 1), so the "
             "reported top class is the majority decision (default: %(default)s)")


def cmd_ensemble(a: argparse.Namespace) -> int:
    from bloodcell.evaluation.evaluate import evaluate_run, format_report
    from bloodcell.inference.ensemble import ENSEMBLE_JSON, make_ensemble

    spec = make_ensemble(a.runs, a.out, vote=a.vote, checkpoint=a.checkpoint)
    out = Path(a.out)
    for m in spec["members"]:
        acc = "not evaluated" if m["test_accuracy"] is None else f"test accuracy {m['test_accuracy']:.4f}"
        print(f"member {m['path']}: {m['model']}, {m['params_trainable']} parameters, {acc}")
    m = evaluate_run(out, "test", a.checkpoint, device=a.device)
    print(format_report(m, m["class_names"]))
    print(f"\nwrote {out / ENSEMBLE_JSON} and {out / 'metrics.json'} (under \"test\"); use {out} like a run folder "
          "with evaluate, predict, explain, export and serve")
    return 0


def add_commands(sub) -> None:
    p = sub.add_parser("ensemble", help="combine finished runs into an ensemble that votes as one model",
                       description="Check that the runs are compatible (same classes in the same order, input size, "
                       "preprocessing recipe and normalisation), write OUT/ensemble.json (members as paths relative "
                       "to OUT, vote, checkpoint, and each member's model, parameters and test accuracy) and evaluate "
                       "the ensemble on the test split into OUT/metrics.json, as 'bloodcell evaluate' does. OUT then "
                       "goes wherever a run folder does: evaluate, predict, serve, export (one ONNX graph holding "
                       "every member and the vote) and explain (Grad-CAM of each member). What it reports as logits "
                       "is the log of the combined probabilities. See docs/ensembles.md.")
    p.add_argument("runs", nargs="+", metavar="RUN", help="finished run folders made by 'bloodcell train' (2 or more)")
    p.add_argument("--vote", choices=VOTES, default="soft", help=VOTE_HELP)
    p.add_argument("--out", required=True, metavar="DIR", help="the ensemble folder to write (new, empty or an "
                   "older ensemble's, which is replaced)")
    add_checkpoint_arg(p, "take from every member (fixed in ensemble.json)")
    add_device_arg(p)
    p.set_defaults(func=cmd_ensemble)
