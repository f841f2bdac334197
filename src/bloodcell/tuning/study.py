"""An Optuna study whose trials are ordinary training runs.

Each trial draws its parameters from the space (TPE sampler), trains into its own run folder
``OUT/trial-NNNN`` (``config.json`` there re-runs it with ``bloodcell train --config``), and reports validation
accuracy after every epoch so the pruner (median or Hyperband) can stop a poor trial early. The study lives in
an Optuna storage: a local SQLite file by default (nothing to set up), or a PostgreSQL URL, which lets the
same command on several machines join one study; each worker stops when the study holds the asked number of
finished trials.
"""

from __future__ import annotations

import os
import re
import socket
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from bloodcell.choices import PRUNERS
from bloodcell.errors import BloodcellError
from bloodcell.training import TrainConfig, train
from bloodcell.tuning.space import DEFAULT_SPACE, apply_params, check_space, sample_params

# Settings that do not change a trial's result, so workers may differ in them.
_LOCAL_FIELDS = ("threads", "device", "data_dir")


@dataclass
class StudyConfig:
    """One worker's view of a study: what every trial shares, what it searches, where it is stored."""

    base: TrainConfig  # the fixed settings of every trial (model, data, epochs, seed, ...)
    study: str
    out: Path  # trial run folders: OUT/trial-NNNN
    trials: int = 20  # finished (complete or pruned) trials the study should hold
    storage: str | None = None  # an SQLAlchemy URL; None: sqlite:///OUT/study.db
    space: dict = field(default_factory=lambda: dict(DEFAULT_SPACE))
    pruner: str = "median"
    sampler_seed: int = 0

    def storage_url(self) -> str:
        return self.storage or f"sqlite:///{(Path(self.out) / 'study.db').resolve()}"


def _optuna():
    try:
        import optuna
    except ImportError:
        raise BloodcellError("bloodcell tune needs Optuna: pip install 'bloodcell[tune]' (and 'bloodcell[postgres]' "
                             "for a PostgreSQL storage)") from None
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # the worker prints its own line per trial
    return optuna


def hide_password(url: str) -> str:
    return re.sub(r"(://[^:/@]+):[^@]*@", r"\1:***@", url)


def make_pruner(name: str, epochs: int):
    optuna = _optuna()
    if name == "median":  # prune below the median of earlier trials at the same epoch, after 2 have finished
        return optuna.pruners.MedianPruner(n_startup_trials=2, n_warmup_steps=0)
    if name == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=1, max_resource=max(1, epochs), reduction_factor=3)
    if name == "none":
        return optuna.pruners.NopPruner()
    raise BloodcellError(f"--pruner '{name}' is not one of {', '.join(PRUNERS)}")


def open_study(url: str, name: str, *, sampler_seed: int = 0, pruner=None, create: bool = True, tries: int = 5):
    """The study ``name`` in storage ``url`` (created if ``create`` and missing), maximising validation accuracy.

    Workers started together race to create Optuna's tables and the study; the loser's unique-key error is
    retried (the winner's tables and study are then found)."""
    for attempt in range(tries):
        try:
            return _open_study(url, name, sampler_seed=sampler_seed, pruner=pruner, create=create)
        except BloodcellError as e:
            if attempt == tries - 1 or not any(k in str(e) for k in ("UniqueViolation", "duplicate key",
                                                                       "IntegrityError", "already exists")):
                raise
            time.sleep(0.5 + attempt)
    raise AssertionError("unreachable")


def _open_study(url: str, name: str, *, sampler_seed: int, pruner, create: bool):
    optuna = _optuna()
    try:
        with warnings.catch_warnings():  # heartbeats are marked experimental; they let a killed worker's trial fail
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            storage = optuna.storages.RDBStorage(url, heartbeat_interval=60, grace_period=180)
        if not create:
            return optuna.load_study(study_name=name, storage=storage, pruner=pruner,
                                     sampler=optuna.samplers.TPESampler(seed=sampler_seed))
        return optuna.create_study(study_name=name, storage=storage, load_if_exists=True, direction="maximize",
                                   sampler=optuna.samplers.TPESampler(seed=sampler_seed), pruner=pruner)
    except KeyError:
        raise BloodcellError(f"--study {name}: no such study in {hide_password(url)}") from None
    except ModuleNotFoundError as e:
        raise BloodcellError(f"--storage {hide_password(url)}: needs the Python module '{e.name}' (for PostgreSQL: "
                             "pip install 'bloodcell[postgres]')") from None
    except Exception as e:  # SQLAlchemy's errors for a bad URL, a refused connection, a failed login
        if type(e).__module__.split(".")[0] not in ("sqlalchemy", "optuna", "psycopg2", "psycopg"):
            raise
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise BloodcellError(f"--storage {hide_password(url)}: cannot open the study ({first})") from None


def _check_same_study(study, cfg: StudyConfig) -> None:
    """A worker joining a study must train what its other workers train; differences are errors, not noise."""
    mine = {"base": {k: v for k, v in cfg.base.to_dict().items() if k not in _LOCAL_FIELDS}, "space": cfg.space}
    theirs = study.user_attrs.get("bloodcell")
    if theirs is None:
        study.set_user_attr("bloodcell", mine)
        return
    for part in ("base", "space"):
        if theirs[part] != mine[part]:
            keys = sorted(k for k in set(theirs[part]) | set(mine[part])
                          if theirs[part].get(k) != mine[part].get(k))
            what = "settings" if part == "base" else "search space"
            raise BloodcellError(f"--study {cfg.study} was created with other {what} ({', '.join(keys)} differ); "
                                 "join it with the same options, or name a new --study")


def finished_trials(study) -> int:
    optuna = _optuna()
    states = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)
    return len(study.get_trials(deepcopy=False, states=states))


def run_study(cfg: StudyConfig, log: Callable[[str], None] = print, pruner=None):
    """Run trials until the study holds ``cfg.trials`` finished ones; returns the Optuna study.

    ``pruner`` overrides ``cfg.pruner`` with an Optuna pruner object (tests use a deterministic one)."""
    optuna = _optuna()
    check_space(cfg.space, "--space")
    cfg.base.validate("--model/options")
    out = Path(cfg.out)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise BloodcellError(f"--out {out}: cannot create the study folder ({e.strerror})") from None
    study = open_study(cfg.storage_url(), cfg.study, sampler_seed=cfg.sampler_seed,
                       pruner=pruner or make_pruner(cfg.pruner, cfg.base.epochs))
    _check_same_study(study, cfg)
    worker = f"{socket.gethostname()}:{os.getpid()}"

    def objective(trial) -> float:
        params = sample_params(trial, cfg.space)
        run_cfg = apply_params(cfg.base, params)
        run_dir = (out / f"trial-{trial.number:04d}").resolve()
        trial.set_user_attr("run_dir", str(run_dir))
        trial.set_user_attr("worker", worker)
        started = time.perf_counter()

        def report(row: dict) -> None:
            trial.report(row["val_acc"], step=row["epoch"])
            if trial.should_prune():
                log(f"trial {trial.number}: pruned after epoch {row['epoch']} (val_acc {row['val_acc']:.4f}, "
                    f"{time.perf_counter() - started:.0f}s)  {_show(params)}")
                raise optuna.TrialPruned()

        try:
            summary = train(run_cfg, run_dir, progress=False, log=lambda s: None, on_epoch=report)
        except BloodcellError as e:  # e.g. diverged: the trial fails with the reason, the study goes on
            trial.set_user_attr("error", str(e))
            log(f"trial {trial.number}: failed ({e})")
            raise
        log(f"trial {trial.number}: val_acc {summary['best_val_acc']:.4f} (epoch {summary['best_epoch']}, "
            f"{time.perf_counter() - started:.0f}s)  {_show(params)}")
        return summary["best_val_acc"]

    remaining = cfg.trials - finished_trials(study)
    if remaining > 0:
        stop = optuna.study.MaxTrialsCallback(cfg.trials, states=(optuna.trial.TrialState.COMPLETE,
                                                                  optuna.trial.TrialState.PRUNED))
        study.optimize(objective, n_trials=remaining, callbacks=[stop], catch=(BloodcellError,),
                       gc_after_trial=True)
    return study


def _show(params: dict) -> str:
    return "  ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in params.items())


def best_config(study) -> TrainConfig:
    """The best finished trial's training config, as saved in its run folder."""
    try:
        best = study.best_trial
    except ValueError:
        raise BloodcellError(f"study {study.study_name}: no trial has finished yet") from None
    return TrainConfig.load(Path(best.user_attrs["run_dir"]) / "config.json")


__all__ = ["PRUNERS", "StudyConfig", "best_config", "finished_trials", "make_pruner", "open_study",
           "run_study"]
