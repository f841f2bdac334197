"""Where the 64 px frontier stops (issue 32): which test images every trained model gets wrong, and whether
their labels look wrong.

Ensembles of our best runs gain little over their members, so the members must share their errors. This
measures that on the real test split: each run's predictions (its best weights, optionally with TTA), how
many images all of them / most of them / at least one of them get wrong, the accuracy an oracle choosing the
right member per image would reach, and cleanlab's label-issue filter on the runs' averaged probabilities (the
test images were seen by none of the runs, so the probabilities are out of sample as cleanlab needs). The
images every run gets wrong are listed with their paths, so a hematologist can look at them.

Usage (from the project root, after ``bloodcell data prepare ... --name pbc`` and training the runs):
    BLOODCELL_DATA_DIR=/tmp/bcdata python benchmarks/shared_errors.py --data pbc --size 64 \
        --tta dihedral --report benchmarks/results/frontier/shared_errors.md RUN [RUN ...]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from bloodcell.data.store import load_dataset  # noqa: E402
from bloodcell.errors import BloodcellError  # noqa: E402
from bloodcell.explain.common import split_paths  # noqa: E402
from bloodcell.explain.review import rank_label_issues  # noqa: E402
from bloodcell.inference import Classifier  # noqa: E402
from bloodcell.io import write_text  # noqa: E402
from bloodcell.machine import machine_info  # noqa: E402


def error_overlap(labels: np.ndarray, member_preds: np.ndarray) -> dict:
    """Counts over images of how many members (rows of ``member_preds``) get each one wrong."""
    wrong = member_preds != labels[None, :]
    n_wrong = wrong.sum(0)
    m = len(member_preds)
    return {
        "members": m,
        "images": int(len(labels)),
        "member_accuracy": [round(float(1 - w.mean()), 4) for w in wrong],
        "wrong_by_all": int((n_wrong == m).sum()),
        "wrong_by_majority": int((n_wrong > m / 2).sum()),
        "wrong_by_any": int((n_wrong > 0).sum()),
        "oracle_accuracy": round(float((n_wrong < m).mean()), 4),
    }


def shared_errors(runs: list[str], *, data: str, size: int, tta: str, data_dir: str | None = None) -> dict:
    ds = load_dataset(data, size, data_dir)
    images, labels = ds.images["test"], ds.labels["test"].astype(int)
    paths = split_paths(ds, "test") or [f"test[{i}]" for i in range(len(labels))]
    probs = [Classifier.from_run(r, "best", device="cpu").predict_arrays(images, tta=tta) for r in runs]
    preds = np.stack([p.argmax(1) for p in probs])
    mean_probs = np.mean(probs, 0)
    vote = mean_probs.argmax(1)
    out = error_overlap(labels, preds)
    _, flagged = rank_label_issues(labels, mean_probs)
    all_wrong = np.flatnonzero((preds != labels[None, :]).all(0))  # the images error_overlap counts as wrong_by_all
    names = ds.class_names
    out.update(
        soft_vote_accuracy=round(float((vote == labels).mean()), 4),
        flagged_by_cleanlab=int(flagged.sum()),
        wrong_by_all_and_flagged=int(flagged[all_wrong].sum()),
        accuracy_if_flagged_were_relabelled=round(float(((vote == labels) | flagged).mean()), 4),
        wrong_by_all_images=[{"path": paths[i], "label": names[labels[i]], "vote": names[vote[i]],
                              "vote_probability": round(float(mean_probs[i].max()), 3),
                              "flagged": bool(flagged[i])} for i in all_wrong],
    )
    return out


def report_md(res: dict, runs: list[str], command: str, machine: dict, tta: str, size: int) -> str:
    m, n = res["members"], res["images"]
    lines = [
        f"# Shared errors of the {size} px frontier's runs (issue 32)", "",
        f"Written by `{command}` on {machine['cpu']}, {machine['cores']} cores, torch {machine['torch']}, "
        f"{time.strftime('%Y-%m-%dT%H:%M:%S%z')}.", "",
        f"{m} runs (best-validation weights, TTA {tta}) on the {n} test images:", "",
        *[f"- `{r}`: {a:.4f}" for r, a in zip(runs, res["member_accuracy"])], "",
        "| measure | images | as accuracy |", "|---|---:|---:|",
        f"| wrong by every run | {res['wrong_by_all']} | {1 - res['wrong_by_all'] / n:.4f} (oracle: one right run "
        f"per image) |",
        f"| wrong by a majority | {res['wrong_by_majority']} | {1 - res['wrong_by_majority'] / n:.4f} |",
        f"| wrong by at least one | {res['wrong_by_any']} | {1 - res['wrong_by_any'] / n:.4f} |",
        f"| soft vote of all runs | | {res['soft_vote_accuracy']:.4f} |",
        f"| flagged by cleanlab (label issue, averaged probabilities) | {res['flagged_by_cleanlab']} | |",
        f"| wrong by every run and flagged | {res['wrong_by_all_and_flagged']} | |",
        f"| soft vote if the flagged labels were the vote's | | {res['accuracy_if_flagged_were_relabelled']:.4f} |",
        "", "The images every run gets wrong (label given, the soft vote's class and probability, cleanlab flag):",
        "", "| path | label | vote | probability | flagged |", "|---|---|---|---:|---|",
        *[f"| {e['path']} | {e['label']} | {e['vote']} | {e['vote_probability']:.3f} | "
          f"{'yes' if e['flagged'] else ''} |" for e in res["wrong_by_all_images"]],
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", nargs="+", help="run folders (their best weights are used)")
    ap.add_argument("--data", default="pbc", help="prepared dataset (default: %(default)s)")
    ap.add_argument("--size", type=int, default=64, help="image size (default: %(default)s)")
    ap.add_argument("--data-dir", default=None, help="prepared datasets' folder (default: $BLOODCELL_DATA_DIR)")
    ap.add_argument("--tta", default="none", choices=("none", "flip", "dihedral"), help="test-time augmentation")
    ap.add_argument("--report", type=Path, default=None, help="markdown report; the JSON goes beside it")
    argv = sys.argv[1:] if argv is None else argv
    a = ap.parse_args(argv)
    try:
        res = shared_errors(a.runs, data=a.data, size=a.size, tta=a.tta, data_dir=a.data_dir)
    except BloodcellError as e:  # a missing run or dataset: one line, not a traceback
        raise SystemExit(f"shared_errors.py: {e}") from None
    machine = machine_info()
    md = report_md(res, a.runs, "python benchmarks/shared_errors.py " + " ".join(argv), machine, a.tta, a.size)
    print(md)
    if a.report:
        write_text(a.report, md)
        write_text(a.report.with_suffix(".json"), json.dumps({**res, "runs": a.runs, "machine": machine}, indent=2))


if __name__ == "__main__":
    main()
