"""``bloodcell benchmark SUITE`` and ``benchmark compare``."""

from __future__ import annotations

import argparse

from bloodcell.choices import CHECKPOINTS, SIZES
from bloodcell.commands.common import DIR_HELP, add_device_arg, add_precision_arg, add_threads_arg
from bloodcell.errors import BloodcellError


def _ints(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got '{text}'") from None


def _names(text: str) -> list[str]:
    return [x.strip() for x in text.split(",") if x.strip()]


def cmd_benchmark_suite(a: argparse.Namespace) -> int:
    from bloodcell.evaluation.benchmark import run_suite, suite_report

    if a.report_only:
        r = suite_report(a.suite, a.out, size=a.size)
    else:
        if not a.seeds:
            raise BloodcellError("--seeds needs at least one seed")
        if a.epochs is not None and a.epochs < 1:
            raise BloodcellError(f"--epochs must be at least 1, not {a.epochs}")
        r = run_suite(a.suite, seeds=a.seeds, out=a.out, data=a.data, size=a.size, data_dir=a.data_dir,
                      epochs=a.epochs, models=a.models, threads=a.threads, precision=a.precision, device=a.device,
                      speed=a.speed, plan_only=a.plan)
        if a.plan:
            return 0
    _print_summary(r)
    return 0


def cmd_benchmark_compare(a: argparse.Namespace) -> int:
    from bloodcell.evaluation.benchmark import compare

    _print_summary(compare(a.dirs, a.out, a.checkpoint, device=a.device))
    return 0


def _print_summary(r: dict) -> None:
    for g in r["groups"]:
        s = g["stats"]
        acc, f1 = s["accuracy"], s["f1_weighted"]
        spread = f" ± {f1[1]:.4f}" if f1[1] is not None else ""
        print(f"{g['label']:<24} seeds {len(g['runs'])}  accuracy {acc[0]:.4f}  weighted F1 {f1[0]:.4f}{spread}")
    print("wrote " + ", ".join(r["files"]))


def add_commands(sub) -> None:
    from bloodcell.evaluation.suites import SUITES

    be = sub.add_parser(
        "benchmark", help="run the paper's experiment suites, or compare finished runs",
        description="Suites train every entry for every seed into OUT/SUITE/ENTRY/seedN (ordinary run folders) "
                    "with the paper's settings (the 'paper' recipe), skip finished runs, resume interrupted ones, "
                    "test the checkpoint the paper tested (the last epoch), and write OUT/SUITE/RESULTS.md, "
                    "results.csv, runs.csv and figures. Run a long suite in pieces (e.g. --models a,b now, the rest "
                    "later); the report always covers every finished run.")
    bsub = be.add_subparsers(dest="suite", required=True, metavar="SUITE")
    for suite in SUITES.values():
        p = bsub.add_parser(suite.name, help=suite.title, description=suite.description)
        p.add_argument("--seeds", type=_ints, default=[0], help="comma-separated seeds (default: 0)")
        p.add_argument("--epochs", type=int, default=None,
                       help="override every entry's epoch count (default: the paper's, 10 or 20)")
        p.add_argument("--models", type=_names, default=None,
                       help="comma-separated entries to run (default: all): "
                       + ", ".join(e.name for e in suite.entries))
        p.add_argument("--out", default="runs/benchmarks", help="root folder of suites (default: %(default)s)")
        p.add_argument("--data", default="bloodmnist",
                       help="a prepared dataset's name, or a MedMNIST-format .npz file (default: %(default)s)")
        p.add_argument("--size", type=int, default=64, choices=SIZES,
                       help="image size in pixels (default: %(default)s, the paper's)")
        p.add_argument("--data-dir", default=None, help=DIR_HELP)
        add_threads_arg(p)
        add_precision_arg(p)
        add_device_arg(p)
        p.add_argument("--speed", action="store_true",
                       help="also measure each run's inference speed when testing it (default: off)")
        p.add_argument("--plan", action="store_true", help="only list the runs and whether each is new, "
                       "interrupted (resume), trained (evaluate) or done")
        p.add_argument("--report-only", action="store_true", help="only rewrite the report from finished runs")
        p.set_defaults(func=cmd_benchmark_suite)
    cp = bsub.add_parser("compare", help="one table and the figures from any finished run folders",
                         description="DIRs are run folders, ensemble folders (bloodcell ensemble) or folders "
                                     "holding them (searched recursively). Runs in folders named seedN are grouped "
                                     "under their parent's name. An ensemble's row has its own test metrics and its "
                                     "members' summed training time and size; every recorded 'evaluate --tta' "
                                     "adds a row of its own.")
    cp.add_argument("dirs", nargs="+", metavar="DIR",
                    help="run or ensemble folders, or folders holding them")
    cp.add_argument("--out", default="runs/compare", help="output folder (default: %(default)s)")
    cp.add_argument("--checkpoint", choices=CHECKPOINTS, default="best",
                    help="weights to test for runs not yet tested: 'best' by validation or 'last' epoch "
                         "(default: %(default)s)")
    add_device_arg(cp)
    cp.set_defaults(func=cmd_benchmark_compare)
