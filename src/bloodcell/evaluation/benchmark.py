"""Suites of runs: train them resumably, then gather any set of finished run folders into one table and figures.

``run_suite`` trains each (entry, seed) into ``OUT/SUITE/ENTRY/seedN`` unless it is finished, resumes it if it
was interrupted, and tests the entry's checkpoint. ``compare`` and the suite report share one writer, so a table
made from a suite and one made from hand-picked run folders look the same.
"""

from __future__ import annotations

import shutil
import time
from collections import Counter
from pathlib import Path

import numpy as np

from bloodcell.errors import BloodcellError
from bloodcell.evaluation.evaluate import evaluate_run, read_history
from bloodcell.io import csv_text, markdown_table, read_json, write_json, write_text
from bloodcell.runfolder import find_runs, run_label
from bloodcell.training.config import TrainConfig

# Config fields that do not change a result, so a suite may be resumed with other values.
NEUTRAL_FIELDS = ("threads", "data_dir", "device")
METRICS = ("accuracy", "f1_weighted", "precision_weighted", "recall_weighted", "f1_macro", "auc_ovr_macro",
           "first_epoch_seconds", "mean_epoch_seconds", "total_seconds", "model_size_mb", "infer_images_per_s")
PAPER_COMPARED = ("accuracy", "f1_weighted")
FLAG_POINTS = 1.5  # differences from the paper larger than this many points are called out


# ---------------------------------------------------------------- running a suite
def entry_config(config: dict, *, seed: int, data: str, size: int, data_dir: str | None = None,
                 epochs: int | None = None, threads: int | None = None, precision: str = "fp32",
                 device: str = "auto", recipe: str = "paper") -> TrainConfig:
    """An entry's settings (the suite's preset plus the entry's own) for one seed and dataset."""
    from bloodcell.training.config import PRESETS

    d = dict(PRESETS[recipe], **config, seed=seed, data=data, size=size, data_dir=data_dir, threads=threads,
             precision=precision, device=device)
    if epochs:
        d["epochs"] = epochs
    return TrainConfig(**d).validate()


def config_differences(saved: TrainConfig, wanted: TrainConfig) -> list[str]:
    a, b = saved.to_dict(), wanted.to_dict()
    return [f"{k} {a[k]!r} vs {b[k]!r}" for k in a if k not in NEUTRAL_FIELDS and a[k] != b[k]]


def run_state(run: Path, cfg: TrainConfig, checkpoint: str) -> str:
    """``new``, ``resume`` (interrupted), ``evaluate`` (trained, not tested) or ``done``."""
    if not (run / "config.json").is_file():
        return "new"
    diff = config_differences(TrainConfig.load(run / "config.json"), cfg)
    if diff:
        raise BloodcellError(f"{run}: holds a run with other settings ({'; '.join(diff)}); "
                             "choose another --out or remove that folder")
    metrics = read_json(run / "metrics.json") if (run / "metrics.json").is_file() else {}
    if metrics.get("training", {}).get("epochs") != cfg.epochs:
        return "resume"
    return "done" if metrics.get("test", {}).get("checkpoint") == checkpoint else "evaluate"


def run_suite(suite_name: str, *, seeds: list[int], out: str | Path, data: str = "bloodmnist", size: int = 64,
              data_dir: str | None = None, epochs: int | None = None, models: list[str] | None = None,
              threads: int | None = None, precision: str = "fp32", device: str = "auto", speed: bool = False,
              plan_only: bool = False, log=print) -> dict:
    """Train and test every selected entry for every seed, skipping finished runs; then write the report.

    ``speed`` also measures inference speed when testing (off by default: a suite's runs share the machine with
    whatever else runs, so its speeds are better measured apart, with benchmarks/model_throughput.py)."""
    from bloodcell.data.store import load_dataset
    from bloodcell.evaluation.suites import get_suite
    from bloodcell.training.loop import train

    suite = get_suite(suite_name)
    root = Path(out) / suite.folder(size)
    jobs = []
    for entry in suite.select(models):
        for seed in seeds:
            run = root / entry.name / f"seed{seed}"
            cfg = entry_config(entry.config, seed=seed, data=data, size=size, data_dir=data_dir, epochs=epochs,
                               threads=threads, precision=precision, device=device, recipe=suite.recipe)
            jobs.append((entry, run, cfg, run_state(run, cfg, entry.checkpoint)))
    for _, run, cfg, state in jobs:
        log(f"{state:<9}{run}  ({cfg.model}, {cfg.epochs} epochs, {cfg.schedule} schedule, balance {cfg.balance})")
    if plan_only:
        return {"root": str(root), "jobs": [(str(r), s) for _, r, _, s in jobs]}
    dataset = None
    for k, (entry, run, cfg, state) in enumerate(jobs, start=1):
        if state == "new" and (twin := finished_twin(Path(out), run, cfg, entry.checkpoint)):
            log(f"[{k}/{len(jobs)}] {run}: same settings as the finished {twin}; copying it instead of training")
            shutil.copytree(twin, run)
            continue
        if state == "done":
            continue
        if dataset is None:
            dataset = load_dataset(data, size, data_dir)
        log(f"[{k}/{len(jobs)}] {run}: {'resuming' if state == 'resume' else state}")
        t0 = time.perf_counter()
        if state in ("new", "resume"):
            train(cfg, run, resume=state == "resume", progress=False, data=dataset, log=log)
        m = evaluate_run(run, "test", entry.checkpoint, speed=speed, device=device)
        log(f"[{k}/{len(jobs)}] {run}: test accuracy {m['accuracy']:.4f}, weighted F1 {m['f1_weighted']:.4f} "
            f"({time.perf_counter() - t0:.0f}s)")
    return suite_report(suite_name, out, size=size)


def finished_twin(out: Path, run: Path, cfg: TrainConfig, checkpoint: str) -> Path | None:
    """A finished run under ``out`` with exactly these settings (e.g. Table 2 row 5 = the oversampling baseline)."""
    for other in sorted(out.glob("*/*/seed*/config.json")):
        other = other.parent
        if other == run or config_differences(TrainConfig.load(other / "config.json"), cfg):
            continue
        if run_state(other, cfg, checkpoint) == "done":
            return other
    return None


# ---------------------------------------------------------------- gathering results
def run_row(run: Path) -> dict:
    """One finished run's figures, from its folder alone."""
    cfg = TrainConfig.load(run / "config.json")
    m = read_json(run / "metrics.json")
    test, tr = m["test"], m.get("training", {})
    row = {"run": str(run), "model": cfg.model, "seed": cfg.seed, "epochs": tr.get("epochs"), "balance": cfg.balance,
           **tested_fields(test)}
    row.update({k: tr.get(k) for k in ("first_epoch_seconds", "mean_epoch_seconds", "total_seconds")})
    row["threads"] = tr.get("threads")  # training CPU time = wall time x threads
    row["machine"] = tr.get("machine")  # None for runs trained before runs recorded it
    row["settings"] = settings_text(cfg, test.get("checkpoint"))
    row["history"] = read_history(run / "history.csv")
    load = row["history"][0].get("load") if row["history"] else None
    row["first_epoch_load"] = None if load is None or np.isnan(load) else load  # runs before the column: unknown
    return row


def tested_fields(test: dict) -> dict:
    """A row's figures from a metrics.json "test" entry (a run's or an ensemble's)."""
    return {"checkpoint": test.get("checkpoint"), "params_keras": test.get("params_keras"),
            "infer_images_per_s": (test.get("speed") or test.get("cpu") or {}).get("throughput_images_per_s"),
            **{k: test.get(k) for k in METRICS if k in test}}


def ensemble_row(folder: Path) -> dict:
    """A tested ensemble's figures: its own test metrics, and its members' training time summed (training it
    costs all of them); the settings name the vote, the members' settings and seeds. The members need not have
    been tested themselves."""
    from bloodcell.inference.ensemble import read_ensemble

    spec = read_ensemble(folder)
    configs, trainings = [], []
    for r in spec["member_runs"]:
        m = read_json(r / "metrics.json") if (r / "metrics.json").is_file() else {}
        if not (r / "config.json").is_file() or "training" not in m:
            raise BloodcellError(f"{folder / 'ensemble.json'}: member run {r} is not a finished run (moved or "
                                 "deleted?)")
        configs.append(TrainConfig.load(r / "config.json"))
        trainings.append(m["training"])
    models = Counter(c.model for c in configs)
    seconds = [t.get("total_seconds") for t in trainings]
    machines = {t.get("machine") for t in trainings}
    settings = "; ".join(sorted({settings_text(c, spec["checkpoint"]) for c in configs}))
    return {"run": str(folder), "model": "ensemble of " + " + ".join(f"{n}x {k}" for k, n in models.items()),
            "seed": 0, "epochs": None, "balance": "none",
            **tested_fields(read_json(folder / "metrics.json")["test"]),
            "total_seconds": None if None in seconds else sum(seconds),
            "machine": machines.pop() if len(machines) == 1 else None, "threads": trainings[0].get("threads"),
            "settings": f"{spec['vote']} vote of {len(configs)} ({settings}, seeds "
                        f"{', '.join(str(c.seed) for c in configs)})",
            "history": [], "first_epoch_load": None}


def tta_rows(run: Path, row: dict) -> list[dict]:
    """One more row per recorded test-time-augmentation evaluation (``evaluate --tta``): the same model and cost,
    its own test metrics; inference speed is left out (TTA runs the model once per view)."""
    m = read_json(run / "metrics.json")
    out = []
    for key in sorted(k for k in m if k.startswith("test_tta_")):
        test = m[key]
        tta = key.removeprefix("test_tta_")
        extra = {k: test.get(k) for k in METRICS if k in test and k not in ("model_size_mb",)}
        out.append({**row, **extra, "infer_images_per_s": None, "settings": f"{row['settings']}, TTA {tta}",
                    "tta": tta})
    return out


def settings_text(cfg: TrainConfig, checkpoint: str | None) -> str:
    opt = cfg.optimizer or _default_optimizer(cfg.model)
    parts = [f"{cfg.epochs} ep", f"{opt} {cfg.lr:g}", cfg.schedule]
    if cfg.momentum:
        parts.append(f"momentum {cfg.momentum:g}")
    if cfg.augment != "none":
        parts.append(f"aug {cfg.augment}")
    if cfg.balance != "none":
        parts.append(f"balance {cfg.balance}")
    parts += recipe_option_parts(cfg)
    if cfg.model_args:
        parts.append(" ".join(f"{k}={v}" for k, v in sorted(cfg.model_args.items())))
    if cfg.precision != "fp32":
        parts.append(f"{cfg.precision} autocast")
    parts.append(f"{checkpoint} ckpt")
    parts.append(f"{cfg.data} {cfg.size}px")  # runs on other data or sizes must never share a mean
    return ", ".join(parts)


def recipe_option_parts(cfg: TrainConfig) -> list[str]:
    """The issue-32 recipe options that are on (runs differing in one must not share a mean)."""
    parts = []
    if cfg.warmup_epochs:
        parts.append(f"warm-up {cfg.warmup_epochs:g} ep")
    if cfg.ema:
        parts.append(f"ema {cfg.ema:g}")
    if cfg.mix != "none":
        parts.append(cfg.mix + (f" {cfg.mix_alpha:g}" if cfg.mix_alpha is not None else ""))
    if cfg.color_jitter:
        parts.append(f"colour jitter {cfg.color_jitter:g}")
    if cfg.scale_jitter:
        parts.append(f"scale jitter {cfg.scale_jitter:g}")
    return parts


def _default_optimizer(model: str) -> str:
    from bloodcell.models.registry import get_spec

    try:
        return get_spec(model).optimizer
    except BloodcellError:
        return "?"


def aggregate(rows: list[dict]) -> dict:
    """Mean and sample std (ddof 1; None for a single seed) of every metric over the rows."""
    out = {}
    for k in METRICS:
        vals = [r[k] for r in rows if r.get(k) is not None]
        out[k] = (float(np.mean(vals)) if vals else None,
                  float(np.std(vals, ddof=1)) if len(vals) > 1 else None)
    return out


def group_rows(rows: list[dict], labels: list[str]) -> list[dict]:
    """Rows grouped by label and settings, in first-seen order, each with its aggregate.

    Runs of one label with different settings (say seed 0 at 10 epochs, seed 1 at 20) are never averaged together:
    each setting gets its own group, labelled "label (settings)"; `entry` keeps the plain label.
    """
    from bloodcell.paper import paper_numbers

    groups: dict[tuple[str, str], dict] = {}
    for label, row in zip(labels, rows):
        g = groups.setdefault((label, row["settings"]), {"label": label, "entry": label, "runs": []})
        g["runs"].append(row)
    settings_per_label = Counter(label for label, _ in groups)
    for (label, settings), g in groups.items():
        if settings_per_label[label] > 1:
            g["label"] = f"{label} ({settings})"
        g["runs"].sort(key=lambda r: r["seed"])
        models = {r["model"] for r in g["runs"]}
        g["model"] = models.pop() if len(models) == 1 else "mixed"
        # the paper's Table 2/3 number of a model only describes runs on the training split as it is
        comparable = g["model"] != "mixed" and all(r.get("balance", "none") == "none" for r in g["runs"])
        g.setdefault("paper", paper_numbers(g["model"]) if comparable else {})
        g["stats"] = aggregate(g["runs"])
    return list(groups.values())


# ---------------------------------------------------------------- writing the table and figures
def _fmt(mean: float | None, std: float | None, digits: int = 4) -> str:
    if mean is None:
        return ""
    return f"{mean:.{digits}f}" + (f" ± {std:.{digits}f}" if std is not None else "")


def _delta_points(ours: float | None, paper: float | None) -> float | None:
    return None if ours is None or paper is None else 100 * (ours - paper)


def results_csv(groups: list[dict]) -> str:
    header = ["label", "model", "seeds", "params_keras", "settings"]
    header += [f"{k}_{s}" for k in METRICS for s in ("mean", "std")]
    header += [f"paper_{k}" for k in (*PAPER_COMPARED, "precision_weighted", "recall_weighted", "first_epoch_seconds")]
    header += [f"diff_points_{k}" for k in PAPER_COMPARED]
    rows = []
    for g in groups:
        r0 = g["runs"][0]
        row = [g["label"], g["model"], " ".join(str(r["seed"]) for r in g["runs"]), r0["params_keras"],
               r0["settings"]]
        for k in METRICS:
            row += [("" if v is None else round(v, 6)) for v in g["stats"][k]]
        row += [g["paper"].get(k, "") for k in (*PAPER_COMPARED, "precision_weighted", "recall_weighted",
                                                "first_epoch_seconds")]
        for k in PAPER_COMPARED:
            d = _delta_points(g["stats"][k][0], g["paper"].get(k))
            row.append("" if d is None else round(d, 2))
        rows.append(row)
    return csv_text(header, rows)


def runs_csv(groups: list[dict]) -> str:
    header = ["label", "run", "model", "seed", "epochs", "checkpoint", "params_keras", *METRICS, "first_epoch_load"]
    rows = [[g["label"], *(r.get(k) for k in header[1:])] for g in groups for r in g["runs"]]
    return csv_text(header, rows)


def results_markdown(groups: list[dict], title: str, description: str, paper_source: str,
                     reproduce: str, figures: list[str], pending: list[str] | None = None) -> str:
    from bloodcell.machine import machine_info

    mi = machine_info()
    machines = Counter(r.get("machine") or "not recorded" for g in groups for r in g["runs"])
    trained_on = "; ".join(f"{m} ({n} run{'s' * (n != 1)})" for m, n in machines.most_common())
    lines = [f"# {title}", "", description, "",
             f"Trained on: {trained_on or '-'}. Report written on: {mi.get('cpu', '?')}, {mi.get('threads', '?')} "
             f"threads, torch {mi.get('torch', '?')}. Times are wall-clock seconds on the CPU each run trained on, "
             f"so compare them only between runs of one machine. Paper: {paper_source}. Δ = ours − paper in points "
             f"(1 point = 0.01); |Δ| > {FLAG_POINTS} is marked **bold**. ± is the sample std over seeds.", "",
             f"Reproduce: `{reproduce}`", ""]
    header = ["entry", "model", "seeds", "params", "accuracy", "paper", "Δ", "weighted F1", "paper", "Δ",
              "w. precision", "w. recall", "macro F1", "AUC", "1st epoch s", "mean epoch s", "size MB", "CPU img/s"]
    cells_by_group = []
    flagged = []
    for g in groups:
        s, p = g["stats"], g["paper"]
        cells = [g["label"], g["model"], str(len(g["runs"])), f"{g['runs'][0]['params_keras']:,}"]
        for k in PAPER_COMPARED:
            d = _delta_points(s[k][0], p.get(k))
            dtext = "" if d is None else f"{d:+.2f}"
            if d is not None and abs(d) > FLAG_POINTS:
                dtext = f"**{dtext}**"
                flagged.append(g)
            cells += [_fmt(*s[k]), "" if k not in p else f"{p[k]:g}", dtext]
        cells += [_fmt(*s[k]) for k in ("precision_weighted", "recall_weighted", "f1_macro", "auc_ovr_macro")]
        cells += [_fmt(*s["first_epoch_seconds"], 1), _fmt(*s["mean_epoch_seconds"], 1),
                  _fmt(s["model_size_mb"][0], None, 2), _fmt(s["infer_images_per_s"][0], None, 0)]
        cells_by_group.append(cells)
    lines += [markdown_table(header, cells_by_group), "",
              "Settings per entry (from each run's config.json; ckpt = the checkpoint tested):", "",
              markdown_table(["entry", "settings", "paper 1st epoch s (T4)", "note"],
                             ([g["label"], g["runs"][0]["settings"], g["paper"].get("first_epoch_seconds", ""),
                               g.get("note", "")] for g in groups))]
    seen = []
    for g in flagged:
        if g["label"] not in seen:
            seen.append(g["label"])
    if seen:
        lines += ["", f"Differing from the paper by more than {FLAG_POINTS} points: {', '.join(seen)}. "
                  "See the notes beside this file for what is known about why."]
    if pending:
        lines += ["", f"Not run yet (no finished run): {', '.join(pending)}."]
    if figures:
        lines += ["", "Figures: " + ", ".join(f"[{f}]({f})" for f in figures)]
    lines += ["", "Per-run figures: `runs.csv`; per-run folders hold config.json, history.csv, metrics.json, "
              "weights and the confusion matrix.", ""]
    return "\n".join(lines)


def write_report(groups: list[dict], out: str | Path, title: str, description: str, paper_source: str,
                 reproduce: str, pending: list[str] | None = None) -> dict:
    from bloodcell.evaluation import plots

    out = Path(out)
    if not groups:
        raise BloodcellError(f"{out}: no finished runs to report")
    labels = [g["label"] for g in groups]
    f1 = [g["stats"]["f1_weighted"] for g in groups]
    figures = [
        plots.bar_metric_png(labels, [m for m, _ in f1], [s or 0 for _, s in f1],
                             [g["paper"].get("f1_weighted") for g in groups], out / "f1_per_model.png",
                             f"{title}: weighted F1 on test", "weighted F1"),
        plots.metric_vs_cost_png(labels, [m for m, _ in f1], [g["stats"]["total_seconds"][0] for g in groups],
                                 [g["stats"]["model_size_mb"][0] for g in groups], out / "f1_vs_time_size.png",
                                 "weighted F1"),
        plots.curves_png({g["label"]: g["runs"][0]["history"] for g in groups}, out / "val_acc_per_epoch.png",
                         ("val_acc",), "validation accuracy per epoch (lowest seed)"),
        plots.curves_png({g["label"]: g["runs"][0]["history"] for g in groups}, out / "training_curves.png",
                         ("train_acc", "val_acc", "train_loss", "val_loss"),
                         "training and validation curves (lowest seed)", panels=True),
    ]
    names = [f.name for f in figures]
    write_text(out / "results.csv", results_csv(groups))
    write_text(out / "runs.csv", runs_csv(groups))
    md = results_markdown(groups, title, description, paper_source, reproduce, names, pending)
    write_text(out / "RESULTS.md", md)
    summary = [{"label": g["label"], "model": g["model"], "seeds": [r["seed"] for r in g["runs"]],
                "stats": g["stats"], "paper": g["paper"]} for g in groups]
    write_json(out / "results.json", summary)
    return {"out": str(out), "groups": groups, "markdown": md,
            "files": [str(out / n) for n in ("RESULTS.md", "results.csv", "runs.csv", *names)]}


def suite_report(suite_name: str, out: str | Path, size: int = 64) -> dict:
    """The report of every finished run of a suite under ``out``, in the suite's order (a per-size suite's runs
    at ``size``)."""
    from bloodcell.evaluation.suites import get_suite

    suite = get_suite(suite_name)
    root = Path(out) / suite.folder(size)
    rows, labels, entries = [], [], {}
    settings: dict[tuple, set] = {}  # (entry, data, size, epochs if not the suite's, precision) -> seeds
    for entry in suite.entries:
        d = root / entry.name
        for run in sorted(d.glob("seed*"), key=lambda p: p.name) if d.is_dir() else []:
            m = run / "metrics.json"
            if m.is_file() and read_json(m).get("test", {}).get("checkpoint") == entry.checkpoint:
                cfg = TrainConfig.load(run / "config.json")
                rows.append(run_row(run))
                labels.append(entry.name)
                epochs = cfg.epochs if cfg.epochs != entry.config["epochs"] else None
                settings.setdefault((entry.name, cfg.data, cfg.size, epochs, cfg.precision), set()).add(cfg.seed)
        entries[entry.name] = entry
    groups = group_rows(rows, labels)
    for g in groups:
        g["paper"], g["note"] = entries[g["entry"]].paper, entries[g["entry"]].note
    pending = [e.name for e in suite.entries if e.name not in {g["entry"] for g in groups}]
    # One command per distinct (data, size, seeds, epochs, precision), so each option names only its entries.
    by_setting: dict[tuple, list[str]] = {}
    for (name, data, size, epochs, precision), seeds in settings.items():
        by_setting.setdefault((data, size, tuple(sorted(seeds)), epochs, precision), []).append(name)
    reproduce = "`; `".join(
        f"bloodcell benchmark {suite.name} --data {data}"
        + (f" --models {','.join(names)}" if len(by_setting) > 1 or pending else "")  # never re-run the rest
        + f" --seeds {','.join(map(str, seeds))}" + (f" --size {size}" if size != 64 else "")
        + (f" --epochs {epochs}" if epochs else "") + (f" --precision {precision}" if precision != "fp32" else "")
        + f" --out {out}"
        for (data, size, seeds, epochs, precision), names in by_setting.items())
    report = write_report(groups, root, suite.title, suite.description, suite.paper_source, reproduce, pending)
    if suite.name == "frontier":
        from bloodcell.evaluation.frontier import write_frontier

        report["files"] += write_frontier(groups, root, size=size)
    return report


def compare(dirs: list[str | Path], out: str | Path, checkpoint: str = "best", device: str = "auto",
            log=print) -> dict:
    """One table and the figures from any finished run folders; runs never tested are tested on ``checkpoint``."""
    from bloodcell.inference.ensemble import is_ensemble

    runs = find_runs(dirs)
    rows, labels = [], []
    for run in runs:
        m = read_json(run / "metrics.json") if (run / "metrics.json").is_file() else {}
        ensemble = is_ensemble(run)
        if "training" not in m and not ensemble:
            log(f"skipping {run}: training not finished")
            continue
        if "test" not in m:
            log(f"testing {run} ({checkpoint} checkpoint)")
            evaluate_run(run, "test", checkpoint, device=device)
        row = ensemble_row(run) if ensemble else run_row(run)
        for r in (row, *tta_rows(run, row)):
            rows.append(r)
            labels.append(run_label(run) + (f" + TTA {r['tta']}" if "tta" in r else ""))
    if not rows:
        raise BloodcellError("no finished runs among " + ", ".join(map(str, dirs)))
    groups = group_rows(rows, labels)
    reproduce = "bloodcell benchmark compare " + " ".join(map(str, dirs)) + f" --out {out}"
    folders = len({r["run"] for r in rows})
    description = (f"{folders} run and ensemble folders from {', '.join(map(str, dirs))}"
                   + (", with a row per recorded TTA evaluation." if len(rows) > folders else "."))
    return write_report(groups, out, "Comparison of runs", description,
                        "paper-facts.md Tables 2 and 3, by model name (the paper's settings may differ from a "
                        "run's)", reproduce)
