"""bloodcell tune: Optuna studies of training runs, on SQLite and on a real PostgreSQL server with 2 workers."""

from __future__ import annotations

import csv
import glob
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import optuna
import pytest
from conftest import synthetic_arrays

from bloodcell.data.sources import prepare_from_npz
from bloodcell.errors import BloodcellError
from bloodcell.training import TrainConfig
from bloodcell.tuning import StudyConfig, open_study, run_study, summarize_study
from bloodcell.tuning.study import best_config

SPACE = {"lr": {"type": "float", "low": 3e-4, "high": 3e-3, "log": True},
         "batch_size": {"type": "categorical", "choices": [32, 64]}}


@pytest.fixture
def cells(tmp_path):
    path = tmp_path / "cells.npz"
    np.savez(path, **synthetic_arrays({"train": 12, "val": 4, "test": 2}, size=28))
    prepare_from_npz(path, name="cells")
    return "cells"


def base(epochs: int = 2) -> TrainConfig:
    return TrainConfig(model="se-cnn", data="cells", size=28, epochs=epochs, threads=1)


def history(run_dir) -> list[dict]:
    with open(Path(run_dir) / "history.csv") as f:
        return [{k: v for k, v in r.items() if k not in ("seconds", "load")} for r in csv.DictReader(f)]


def tune_cmd(*args) -> list[str]:
    return [sys.executable, "-m", "bloodcell", "tune", "--data", "cells", "--size", "28", "--threads", "1", *args]


def test_a_sqlite_study_runs_trials_as_run_folders_repeatably_and_its_best_config_reruns_exactly(cells, tmp_path):
    cfg = StudyConfig(base=base(), study="s", out=tmp_path / "a", trials=3, space=SPACE, pruner="none")
    study = run_study(cfg, log=lambda s: None)
    trials = study.get_trials()
    assert [t.state for t in trials] == [optuna.trial.TrialState.COMPLETE] * 3
    for t in trials:  # each trial is an ordinary run whose config holds the drawn parameters
        saved = TrainConfig.load(Path(t.user_attrs["run_dir"]) / "config.json")
        assert saved.lr == t.params["lr"] and saved.batch_size == t.params["batch_size"]
        assert len(history(t.user_attrs["run_dir"])) == 2
        assert t.value == max(float(r["val_acc"]) for r in history(t.user_attrs["run_dir"]))
    assert (tmp_path / "a" / "study.db").is_file()  # the default storage: SQLite in the study folder

    again = run_study(StudyConfig(base=base(), study="s", out=tmp_path / "b", trials=3, space=SPACE, pruner="none"),
                      log=lambda s: None)  # the same seed draws the same parameters and the same results
    assert [t.params for t in again.get_trials()] == [t.params for t in trials]
    assert [t.value for t in again.get_trials()] == [t.value for t in trials]

    summary = summarize_study(study, tmp_path / "a")
    assert summary["trials"]["complete"] == 3 and summary["best"][0]["value"] == study.best_value
    assert set(summary["importances"]) == {"lr", "batch_size"}
    for name in ("summary.md", "summary.json", "best_config.json", "optimization_history.png",
                 "param_importances.png"):
        assert (tmp_path / "a" / name).stat().st_size > 0, name
    assert best_config(study) == TrainConfig.load(tmp_path / "a" / "best_config.json")

    rerun = tmp_path / "rerun"
    best = str(tmp_path / "a" / "best_config.json")
    p = subprocess.run([sys.executable, "-m", "bloodcell", "train", "--config", best,
                        "--out", str(rerun)], capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr
    assert history(rerun) == history(study.best_trial.user_attrs["run_dir"])


def test_a_pruned_trial_keeps_the_epochs_it_ran(cells, tmp_path):
    cfg = StudyConfig(base=base(epochs=3), study="p", out=tmp_path / "p", trials=2, space=SPACE)
    study = run_study(cfg, log=lambda s: None, pruner=optuna.pruners.ThresholdPruner(lower=2.0))  # prunes all
    assert [t.state for t in study.get_trials()] == [optuna.trial.TrialState.PRUNED] * 2
    for t in study.get_trials():
        assert len(history(t.user_attrs["run_dir"])) == 1 and list(t.intermediate_values) == [1]
        assert TrainConfig.load(Path(t.user_attrs["run_dir"]) / "config.json").epochs == 3
    again = run_study(StudyConfig(base=base(epochs=3), study="p", out=tmp_path / "p", trials=2, space=SPACE),
                      log=lambda s: None)  # pruned trials count as finished: nothing more to run
    assert len(again.get_trials()) == 2


def test_the_cli_sweeps_with_hyperband_and_writes_the_summary(cells, tmp_path):
    out = tmp_path / "h"
    space = tmp_path / "space.json"
    space.write_text(json.dumps(SPACE))
    p = subprocess.run(tune_cmd("--space", str(space), "--epochs", "3", "--trials", "3", "--pruner", "hyperband",
                                "--study", "h", "--out", str(out)), capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr
    assert "Traceback" not in p.stderr and "Warning" not in p.stderr
    lines = [line for line in p.stdout.splitlines() if line.startswith("trial ")]
    assert len(lines) == 3, p.stdout
    summary = json.loads((out / "summary.json").read_text())
    assert summary["trials"]["complete"] + summary["trials"]["pruned"] == 3
    assert f"bloodcell train --config {out / 'best_config.json'}" in p.stdout
    p = subprocess.run(tune_cmd("--space", str(space), "--epochs", "3", "--trials", "3", "--study", "h", "--out",
                                str(out)), capture_output=True, text=True, timeout=600)
    assert p.returncode == 0 and not [ln for ln in p.stdout.splitlines() if ln.startswith("trial ")]  # done


@pytest.mark.parametrize(("space", "message"), [
    ({"lrr": {"type": "float", "low": 1e-4, "high": 1e-2}}, "'lrr' is not a training-config field"),
    ({"epochs": {"type": "int", "low": 1, "high": 9}}, "'epochs' is fixed for a study"),
    ({"lr": {"type": "float", "low": 0, "high": 1e-2, "log": True}}, "log-scaled, so low must be positive"),
    ({"lr": {"type": "float", "low": 1e-2, "high": 1e-4}}, "needs numbers low <= high"),
    ({"lr": {"type": "uniform", "low": 1e-4, "high": 1e-2}}, "needs a \"type\" of float, int or categorical"),
    ({"batch_size": {"type": "categorical", "choices": []}}, "needs a non-empty list of choices"),
    ({"lr": {"type": "float", "low": 1e-4, "high": 1e-2, "lg": True}}, "unknown key(s) lg"),
    ([], "a search space is a non-empty JSON object"),
])
def test_a_bad_space_is_a_one_line_error_naming_the_file(cells, tmp_path, space, message):
    path = tmp_path / "space.json"
    path.write_text(json.dumps(space))
    p = subprocess.run(tune_cmd("--space", str(path), "--out", str(tmp_path / "o")), capture_output=True, text=True,
                       timeout=120)
    assert p.returncode == 2 and "Traceback" not in p.stderr
    assert len(p.stderr.strip().splitlines()) == 1 and str(path) in p.stderr and message in p.stderr, p.stderr


@pytest.mark.parametrize(("args", "message"), [
    (["--lr", "0.001"], "--lr is both fixed on the command line and searched by the space"),
    (["--storage", "nosuchdb://x"], "--storage nosuchdb://x: cannot open the study"),
    (["--storage", "postgresql+psycopg2://me:secret@127.0.0.1:1/db"], "cannot open the study"),
])
def test_bad_tune_options_are_one_line_errors(cells, tmp_path, args, message):
    p = subprocess.run(tune_cmd(*args, "--out", str(tmp_path / "o")), capture_output=True, text=True, timeout=120)
    assert p.returncode == 2 and "Traceback" not in p.stderr
    assert len(p.stderr.strip().splitlines()) == 1 and message in p.stderr, p.stderr
    assert "secret" not in p.stderr  # a password in the URL is never printed


def test_joining_a_study_with_other_settings_is_refused(cells, tmp_path):
    run_study(StudyConfig(base=base(epochs=1), study="j", out=tmp_path / "j", trials=1, space=SPACE),
              log=lambda s: None)
    with pytest.raises(BloodcellError, match=r"was created with other settings \(epochs differ\)"):
        run_study(StudyConfig(base=base(epochs=2), study="j", out=tmp_path / "j", trials=2, space=SPACE),
                  log=lambda s: None)
    with pytest.raises(BloodcellError, match="no such study"):
        open_study(f"sqlite:///{tmp_path / 'j' / 'study.db'}", "nope", create=False)


@pytest.mark.parametrize(("args", "message"), [
    (["--resume"], "--config starts a new run from a saved config"),
    (["--recipe", "paper"], "--config already holds every setting"),
])
def test_train_config_conflicts_are_errors(tmp_path, args, message):
    cfg = tmp_path / "config.json"
    base().save(cfg)
    p = subprocess.run([sys.executable, "-m", "bloodcell", "train", "--config", str(cfg), "--out",
                        str(tmp_path / "r"), *args], capture_output=True, text=True, timeout=120)
    assert p.returncode == 2 and message in p.stderr and "Traceback" not in p.stderr, p.stderr


def test_train_config_takes_options_given_on_top(cells, tmp_path):
    cfg = tmp_path / "config.json"
    TrainConfig(model="se-cnn", data="cells", size=28, epochs=3, threads=1, seed=5, lr=5e-4).save(cfg)
    p = subprocess.run([sys.executable, "-m", "bloodcell", "train", "--config", str(cfg), "--epochs", "1",
                        "--seed", "0", "--out", str(tmp_path / "r")], capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    saved = TrainConfig.load(tmp_path / "r" / "config.json")
    assert (saved.epochs, saved.seed, saved.lr, saved.size) == (1, 0, 5e-4, 28)  # --seed 0 wins though a default


# --- PostgreSQL: a real server on localhost, started by the test (Debian's postgresql package) ---------------------

def _pg_bin() -> str | None:
    for d in sorted(glob.glob("/usr/lib/postgresql/*/bin"), reverse=True):
        if os.path.exists(f"{d}/initdb") and os.path.exists(f"{d}/pg_ctl"):
            return d
    found = shutil.which("pg_ctl")
    return str(Path(found).parent) if found else None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def postgres():
    """A throw-away PostgreSQL server on 127.0.0.1 (trust auth); its SQLAlchemy URL. CI sets
    BLOODCELL_REQUIRE_POSTGRES=1 so a missing server fails instead of skipping."""
    bindir = _pg_bin()
    if bindir is None:
        if os.environ.get("BLOODCELL_REQUIRE_POSTGRES"):
            pytest.fail("PostgreSQL is required here but not installed (apt-get install postgresql)")
        pytest.skip("PostgreSQL is not installed (apt-get install postgresql)")
    root = Path(tempfile.mkdtemp(prefix="bloodcell-pg-"))
    as_user: list[str] = []
    if os.geteuid() == 0:  # the server refuses to run as root: run it as Debian's postgres user
        import pwd

        pw = pwd.getpwnam("postgres")
        os.chown(root, pw.pw_uid, pw.pw_gid)
        as_user = ["runuser", "-u", "postgres", "--"]
    port, data = _free_port(), root / "data"
    subprocess.run([*as_user, f"{bindir}/initdb", "-D", str(data), "-U", "postgres", "--auth=trust", "-E", "UTF8"],
                   check=True, capture_output=True)
    subprocess.run([*as_user, f"{bindir}/pg_ctl", "-D", str(data), "-l", str(root / "log"), "-w", "-o",
                    f"-p {port} -k {root} -c listen_addresses=127.0.0.1 -c fsync=off", "start"],
                   check=True, capture_output=True)
    try:
        yield f"postgresql+psycopg2://postgres@127.0.0.1:{port}/postgres"
    finally:
        subprocess.run([*as_user, f"{bindir}/pg_ctl", "-D", str(data), "-m", "fast", "stop"], capture_output=True)
        shutil.rmtree(root, ignore_errors=True)


def test_two_workers_join_one_study_on_postgresql(cells, tmp_path, postgres):
    space = tmp_path / "space.json"
    space.write_text(json.dumps(SPACE))
    args = tune_cmd("--space", str(space), "--epochs", "2", "--trials", "4", "--pruner", "none", "--study", "pg",
                    "--storage", postgres, "--out", str(tmp_path / "pg"))
    workers = [subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outputs = [w.communicate(timeout=900) for w in workers]
    for w, (_, err) in zip(workers, outputs):
        assert w.returncode == 0, err
    study = open_study(postgres, "pg", create=False)
    done = [t for t in study.get_trials() if t.state == optuna.trial.TrialState.COMPLETE]
    assert 4 <= len(done) <= 5  # each worker stops once 4 have finished; one may be running then
    assert len({t.user_attrs["worker"] for t in done}) == 2  # both workers ran trials of the one study
    assert len({t.user_attrs["run_dir"] for t in done}) == len(done)  # trial numbers are the study's: no clash
    for t in done:
        assert TrainConfig.load(Path(t.user_attrs["run_dir"]) / "config.json").lr == t.params["lr"]
    ran = sum(len([ln for ln in out.splitlines() if ln.startswith("trial ")]) for out, _ in outputs)
    assert ran == len(study.get_trials())
    assert (tmp_path / "pg" / "summary.json").is_file() and not (tmp_path / "pg" / "study.db").exists()
