"""Issue 32's recipe ablation on SE-CNN: the recommended recipe (the base) and variants that each change exactly
one setting, trained with the same seeds, so each difference in test accuracy is that one setting's.

Usage (from the project root, with the package installed; prepare the data first):
    bloodcell data prepare --source ../shared/data/pbc --split-file ../shared/data/pbc/split.csv
    python benchmarks/recipe_ablation.py                      # every variant x seeds 0,1,2 (many CPU-hours)
    python benchmarks/recipe_ablation.py --variants base,mixup --seeds 0 --epochs 1 --train-limit 256  # smoke

Every run is ``bloodcell train ... --evaluate`` in its own process, into OUT/VARIANT/seedS. Resumable: a run whose
metrics.json holds test results is skipped, an unfinished one continues with ``bloodcell train --resume``. The
TTA variant trains nothing: it evaluates the base runs with ``bloodcell evaluate --tta dihedral``. Writes the
table to --report (markdown) and the figures beside it (.json), with the machine and the exact command.
"""

from __future__ import annotations

import argparse
import datetime as dt
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from bloodcell.choices import RECIPE_SETTINGS
from bloodcell.io import read_json, write_json, write_text
from bloodcell.machine import machine_info, machine_load

ROOT = Path(__file__).resolve().parent
REVIEW = ROOT / "results" / "explain" / "review"
FLAGGED = REVIEW / "corrections_drop_flagged.csv"  # drop rows built from label_review_top50.csv (README there)


@dataclass(frozen=True)
class Variant:
    """One change to the base recipe: extra ``bloodcell train`` options, or a TTA mode at evaluation."""

    name: str
    change: str
    args: tuple[str, ...] = ()
    tta: str = "none"  # not "none": evaluate the base runs with this TTA instead of training
    corrections: str | None = None  # a corrections CSV: train the base recipe on the data prepared with it
    of: str = "base"  # for a TTA variant: the variant whose runs it evaluates


# The base every variant changes one setting of: the recommended recipe as it was when this ablation ran (before
# the ablation's findings changed the defaults), given to every run as explicit options, so that a run added or
# resumed later still trains what the base's finished runs trained.
ABLATION_BASE = dict(batch_size=64, optimizer="adam", lr=1e-3, momentum=0.0, weight_decay=0.0, schedule="cosine",
                     augment="dihedral", label_smoothing=0.0, balance="none", bn_recalibrate=2048, warmup_epochs=0,
                     ema=0.0, mix="none", color_jitter=0.0, scale_jitter=0.0)


def base_args() -> tuple[str, ...]:
    """ABLATION_BASE as ``bloodcell train`` options."""
    return tuple(x for k, v in ABLATION_BASE.items() for x in (f"--{k.replace('_', '-')}", f"{v:g}"
                                                                if isinstance(v, float) else str(v)))


def variants(base_epochs: int) -> dict[str, Variant]:
    """The base and its one-change variants (the warm-up is capped at the run's epochs for smoke runs)."""
    base = ABLATION_BASE
    warm = min(2, base_epochs)
    out = [
        Variant("base", f"none: the base recipe ({base['optimizer']} {base['lr']:g}, {base['schedule']}, "
                        f"augment {base['augment']}, {base_epochs} epochs, TTA none)"),
        Variant("adamw", "AdamW, weight decay 0.05", ("--optimizer", "adamw", "--weight-decay", "0.05")),
        Variant("warmup", f"linear warm-up over {warm:g} epochs", ("--warmup-epochs", str(warm))),
        Variant("label-smoothing", "label smoothing 0.1", ("--label-smoothing", "0.1")),
        Variant("augment-flip", "augment flip (not dihedral)", ("--augment", "flip")),
        Variant("augment-none", "no flip/turn augmentation", ("--augment", "none")),
        Variant("color-jitter", "colour/stain jitter 0.5", ("--color-jitter", "0.5")),
        Variant("scale-jitter", "scale jitter 0.15 (zoom 0.85-1.15)", ("--scale-jitter", "0.15")),
        Variant("mixup", "mixup (alpha 0.2)", ("--mix", "mixup")),
        Variant("cutmix", "cutmix (alpha 1.0)", ("--mix", "cutmix")),
        Variant("ema", "EMA of the weights, decay 0.999", ("--ema", "0.999")),
        *[Variant(f"epochs{n}", f"{n} epochs", ("--epochs", str(n))) for n in (10, 20, 30) if n != base_epochs],
        Variant("tta-dihedral", "TTA dihedral at evaluation (base runs, no training)", tta="dihedral"),
        Variant("adamw-ls", "AdamW (weight decay 0.05) and label smoothing 0.1 together",
                ("--optimizer", "adamw", "--weight-decay", "0.05", "--label-smoothing", "0.1")),
        Variant("adamw-ls-tta", "adamw-ls, TTA dihedral at evaluation (its runs, no training)", tta="dihedral",
                of="adamw-ls"),
        # the probe (0.9918 on seed 0 at 64 px with 8-view TTA): several changes at once, to check it
        Variant("issue-probe", "AdamW (wd 0.05), warm-up 2 epochs, label smoothing 0.1, 30 epochs (the issue's probe)",
                ("--optimizer", "adamw", "--weight-decay", "0.05", "--warmup-epochs", str(warm),
                 "--label-smoothing", "0.1", "--epochs", "30")),
        Variant("issue-probe-tta", "issue-probe, TTA dihedral at evaluation (its runs, no training)",
                tta="dihedral", of="issue-probe"),
        *[Variant("epochs30-tta", "30 epochs, TTA dihedral at evaluation (its runs, no training)", tta="dihedral",
                  of="epochs30")] * (base_epochs != 30),
        Variant("drop-flagged", "train/val without the 34 cleanlab-flagged images of the label review's top 50 "
                                "(the conflicting duplicate among them); test unchanged", corrections=str(FLAGGED)),
    ]
    return {v.name: v for v in out}


class StepFailed(Exception):
    """A ``bloodcell`` child process failed; it has printed its own one-line error."""


def bloodcell(*args: str) -> None:
    """Run ``bloodcell ARGS`` in a child process."""
    if subprocess.run([sys.executable, "-m", "bloodcell", *args]).returncode != 0:
        raise StepFailed(f"bloodcell {args[0]} {args[1] if len(args) > 1 else ''} failed (its error is above)")


def finished(run: Path, key: str = "test") -> bool:
    metrics = run / "metrics.json"
    return metrics.is_file() and key in read_json(metrics)


def corrected_data(a: argparse.Namespace, corrections: str) -> str:
    """Prepare (or reuse from the cache) ``--source`` with ``corrections`` applied; returns the dataset name."""
    name = f"{a.data}-{Path(corrections).stem.replace('_', '-')}"
    source = Path(a.source)
    bloodcell("data", "prepare", "--source", str(source), "--split-file", str(source / "split.csv"),
              "--size", str(a.size), "--name", name, "--corrections", corrections)
    return name


def train_run(a: argparse.Namespace, v: Variant, seed: int, run: Path) -> None:
    """Train and test one (variant, seed), or continue it; a finished run is left alone."""
    if finished(run):
        return
    if (run / "config.json").is_file():
        args = ["train", "--resume", "--out", str(run), "--evaluate"]
    else:
        data = corrected_data(a, v.corrections) if v.corrections else a.data
        args = ["train", "--model", "se-cnn", "--data", data, "--size", str(a.size), "--seed", str(seed),
                "--epochs", str(a.epochs), *base_args(), *v.args, "--out", str(run), "--evaluate"]
        args += ["--train-limit", str(a.train_limit)] if a.train_limit else []
        args += ["--threads", str(a.threads)] if a.threads else []
    print(f"[{v.name} seed {seed}] bloodcell {' '.join(args)}", flush=True)
    bloodcell(*args)


def tta_eval(v: Variant, run: Path) -> None:
    if not finished(run, f"test_tta_{v.tta}"):
        bloodcell("evaluate", str(run), "--tta", v.tta)


def seed_result(run: Path, key: str) -> dict:
    m = read_json(run / "metrics.json")
    return {"run": str(run), "accuracy": m[key]["accuracy"], "f1_weighted": m[key]["f1_weighted"],
            "checkpoint_epoch": m[key].get("checkpoint_epoch"), "train_seconds": m["training"]["total_seconds"],
            # training CPU time as the frontier counts it: wall seconds of every epoch (a resumed run's too) x threads
            "cpu_seconds": m["training"]["total_seconds"] * (m["training"].get("threads") or 1),
            "machine": m["training"].get("machine")}


def run_variant(a: argparse.Namespace, v: Variant) -> dict | None:
    """Every seed of ``v`` (trained or evaluated as needed) and their test results; with ``--report-only`` the
    seeds that are finished (None if there are none)."""
    out = []
    key = f"test_tta_{v.tta}" if v.tta != "none" else "test"
    for seed in a.seeds:
        trained = variants(a.epochs)[v.of] if v.tta != "none" else v
        run = Path(a.out) / trained.name / f"seed{seed}"
        if a.report_only:
            if finished(run, key):
                out.append({"seed": seed, **seed_result(run, key)})
            continue
        train_run(a, trained, seed, run)
        if v.tta != "none":
            tta_eval(v, run)
        out.append({"seed": seed, **seed_result(run, key)})
    if not out:
        return None
    return {"name": v.name, "change": v.change, "args": list(v.args), "tta": v.tta, "seeds": out,
            **summarize(out)}


def summarize(seeds: list[dict]) -> dict:
    """Mean and sample std (ddof 1, the convention of every bloodcell report) over the seeds."""
    acc = np.array([s["accuracy"] for s in seeds])
    cpu = [s["cpu_seconds"] for s in seeds if s["cpu_seconds"] is not None]
    return {"n": len(seeds), "seed_list": [s["seed"] for s in seeds],
            "machines": sorted({s.get("machine") or "?" for s in seeds}), "accuracy_mean": round(float(acc.mean()), 4),
            "accuracy_std": round(float(acc.std(ddof=1)), 4) if len(acc) > 1 else None,
            "cpu_minutes_mean": round(float(np.mean(cpu)) / 60, 3) if cpu else None}


def paired_delta(x: dict, base: dict) -> str:
    """The variant's mean minus the base's mean over the same seeds (blank if the base lacks one of them)."""
    by_seed = {s["seed"]: s["accuracy"] for s in base["seeds"]}
    seeds = [s["seed"] for s in x["seeds"]]
    if not all(s in by_seed for s in seeds):
        return ""
    return f"{np.mean([s['accuracy'] for s in x['seeds']]) - np.mean([by_seed[s] for s in seeds]):+.4f}"


def render(r: dict) -> str:
    m = r["machine"]
    lines = ["# SE-CNN recipe ablation (issue 32): one change at a time, same seeds", "",
             ("Report of the finished runs (nothing trained), written by" if r.get("report_only") else "Command:")
             + f" `{r['command']}` on {m['cpu']}, {m['cores']} cores, torch {m['torch']}, {r['date_utc']}.", "",
             f"Data {r['data']} at {r['size']} px, seeds {', '.join(map(str, r['seed_list']))}, base epochs "
             f"{r['epochs']}" + (f", training subset of {r['train_limit']} images" if r["train_limit"] else "")
             + ". Test accuracy of the best-validation checkpoint, mean +- sample std (ddof 1) over seeds; CPU "
             "minutes are training wall time x threads (the frontier's training CPU-minutes); delta is "
             "the variant's mean minus the base's mean over the same seeds. The machine column is where each "
             "row's runs trained: CPU-minutes are comparable only between rows of the same machine.", "",
             "| variant | the one change | test accuracy | seeds | CPU-minutes | delta vs base | trained on |",
             "|---|---|---|---|---|---|---|"]
    base = next((x for x in r["variants"] if x["name"] == "base"), None)
    for x in r["variants"]:
        acc = f"{x['accuracy_mean']:.4f}" + (f" +- {x['accuracy_std']:.4f}" if x["accuracy_std"] is not None else "")
        cpu = "-" if x["cpu_minutes_mean"] is None else f"{x['cpu_minutes_mean']:.1f}"
        if x["tta"] != "none":
            cpu += " (the evaluated runs' training)"
        delta = "" if base is None or x is base else paired_delta(x, base)
        lines.append(f"| {x['name']} | {x['change']} | {acc} | {', '.join(map(str, x['seed_list']))} | {cpu} | "
                     f"{delta} | {', '.join(x['machines'])} |")
    return "\n".join(lines) + "\n"


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", default="0,1,2", help="comma-separated seeds (default: %(default)s)")
    p.add_argument("--epochs", type=int, default=RECIPE_SETTINGS["recommended"]["epochs"],
                   help="the base recipe's epochs (default: %(default)s)")
    p.add_argument("--data", default="pbc", help="prepared dataset (default: %(default)s)")
    p.add_argument("--source", default=str(ROOT.parent.parent / "shared" / "data" / "pbc"),
                   help="the image folder (with split.csv) that --data was prepared from, for the drop-flagged "
                        "variant's corrected copy (default: %(default)s)")
    p.add_argument("--size", type=int, default=64, help="image size (default: %(default)s)")
    p.add_argument("--train-limit", type=int, default=None, help="train on N images (smoke runs)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads per run (default: all cores)")
    p.add_argument("--out", default="runs/ablation", help="runs folder (default: %(default)s)")
    p.add_argument("--variants", default=None, help="comma-separated subset of the variants (default: all)")
    p.add_argument("--report-only", action="store_true",
                   help="train and evaluate nothing: the table of the runs already finished among --seeds "
                        "(a variant may then have fewer seeds than another; the seeds column says which)")
    p.add_argument("--report", default=str(ROOT / "results" / "frontier" / "ablation.md"),
                   help="markdown table; the JSON goes beside it (default: %(default)s)")
    a = p.parse_args(argv)
    a.seeds = [int(s) for s in a.seeds.split(",")]
    known = variants(a.epochs)
    a.variant_names = a.variants.split(",") if a.variants else list(known)
    unknown = [v for v in a.variant_names if v not in known]
    if unknown:
        p.error(f"unknown variant(s) {', '.join(unknown)}; known: {', '.join(known)}")
    return a


def main(argv: list[str] | None = None) -> int:
    a = parse(argv)
    command = "python benchmarks/recipe_ablation.py " + " ".join(argv if argv is not None else sys.argv[1:])
    known = variants(a.epochs)
    try:
        results = [r for name in a.variant_names if (r := run_variant(a, known[name])) is not None]
    except StepFailed as e:
        print(f"recipe_ablation: error: {e}", file=sys.stderr)
        return 1
    if not results:
        print(f"recipe_ablation: error: no finished runs of {', '.join(a.variant_names)} for seeds "
              f"{', '.join(map(str, a.seeds))} under {a.out}", file=sys.stderr)
        return 1
    report = {"command": command.strip(), "machine": {**machine_info(), "load_1min": machine_load()},
              "date_utc": dt.datetime.now(dt.timezone.utc).replace(microsecond=0).isoformat(),
              "data": a.data, "size": a.size, "epochs": a.epochs, "seed_list": a.seeds,
              "train_limit": a.train_limit, "report_only": a.report_only, "base_recipe": ABLATION_BASE,
              "recommended_recipe": RECIPE_SETTINGS["recommended"], "variants": results}
    md = Path(a.report)
    write_json(md.with_suffix(".json"), report)
    write_text(md, render(report))
    print(render(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
