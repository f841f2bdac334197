"""What a study found: its best trials, which parameters mattered, and Optuna's own plots of its history."""

from __future__ import annotations

import shutil
import warnings
from pathlib import Path

from bloodcell.io import markdown_table, write_json, write_text


def _trial_row(t) -> dict:
    return {"number": t.number, "state": t.state.name.lower(), "value": t.value,
            "epochs": len(t.intermediate_values), "params": t.params, "run_dir": t.user_attrs.get("run_dir"),
            "worker": t.user_attrs.get("worker"), "error": t.user_attrs.get("error")}


def _importances(study) -> tuple[dict | None, str | None]:
    import optuna

    done = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
    if len(done) < 2:
        return None, f"needs at least 2 complete trials, the study has {len(done)}"
    try:
        with warnings.catch_warnings():  # on a few trials fANOVA warns that its quantiles coincide
            warnings.simplefilter("ignore", UserWarning)
            return dict(optuna.importance.get_param_importances(study)), None
    except (RuntimeError, ValueError) as e:  # e.g. every complete trial drew the same value
        return None, str(e).splitlines()[0]


def _plots(study, out: Path, with_importances: bool) -> list[str]:
    import optuna.visualization.matplotlib as ovm

    from bloodcell.plotting import save_figure

    wanted = [("optimization_history.png", ovm.plot_optimization_history),
              ("intermediate_values.png", ovm.plot_intermediate_values)]
    if with_importances:
        wanted.append(("param_importances.png", ovm.plot_param_importances))
    written = []
    for name, plot in wanted:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # Optuna marks its matplotlib backend experimental
            ax = plot(study)
        save_figure(ax.figure, out / name)
        written.append(name)
    return written


def summarize_study(study, out: str | Path, top: int = 5) -> dict:
    """Write ``summary.json``, ``summary.md``, ``best_config.json`` (re-run it with ``bloodcell train --config``)
    and the plots into ``out``; returns the summary."""
    import optuna

    out = Path(out)
    trials = study.get_trials(deepcopy=False)
    done = sorted((t for t in trials if t.state == optuna.trial.TrialState.COMPLETE),
                  key=lambda t: -t.value)
    counts = {s.name.lower(): sum(t.state == s for t in trials) for s in optuna.trial.TrialState}
    importances, why_none = _importances(study)
    summary = {"study": study.study_name, "direction": "maximize validation accuracy", "trials": counts,
               "best": [_trial_row(t) for t in done[:top]], "importances": importances,
               "importances_missing": why_none,
               "workers": sorted({t.user_attrs.get("worker") for t in trials if t.user_attrs.get("worker")})}
    if done:
        best_cfg = Path(done[0].user_attrs["run_dir"]) / "config.json"
        if best_cfg.is_file():
            shutil.copyfile(best_cfg, out / "best_config.json")
            summary["best_config"] = str(out / "best_config.json")
    summary["plots"] = _plots(study, out, importances is not None) if trials else []
    write_json(out / "summary.json", summary)
    write_text(out / "summary.md", summary_markdown(summary))
    return summary


def summary_markdown(s: dict) -> str:
    counts = ", ".join(f"{n} {state}" for state, n in s["trials"].items() if n)
    lines = [f"# Study {s['study']}", "", f"Trials: {counts or 'none'}; objective: {s['direction']} (best epoch "
             "of each trial).", "", "## Best trials", ""]
    if s["best"]:
        lines.append(markdown_table(
            ["trial", "val acc", "epochs", "parameters", "run folder"],
            [[r["number"], f"{r['value']:.4f}", r["epochs"],
              ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in r["params"].items()),
              r["run_dir"]] for r in s["best"]]))
    else:
        lines.append("No trial has completed yet.")
    lines += ["", "## Parameter importances (fANOVA)", ""]
    if s["importances"]:
        lines.append(markdown_table(["parameter", "importance"],
                                    [[k, f"{v:.3f}"] for k, v in s["importances"].items()]))
    else:
        lines.append(f"Not computed: {s['importances_missing']}.")
    if s.get("best_config"):
        lines += ["", f"Re-run the best trial: `bloodcell train --config {s['best_config']} --out runs/best`"]
    if s["plots"]:
        lines += ["", "Plots: " + ", ".join(f"[{p}]({p})" for p in s["plots"])]
    return "\n".join(lines) + "\n"
