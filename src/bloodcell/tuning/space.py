"""A search space: which training-config fields a trial draws, and from what.

A space is a JSON object, one entry per parameter, each a distribution Optuna knows::

    {"lr": {"type": "float", "low": 1e-4, "high": 3e-3, "log": true},
     "batch_size": {"type": "categorical", "choices": [32, 64, 128]},
     "model_args.dropout": {"type": "float", "low": 0.0, "high": 0.5}}

A name is a ``TrainConfig`` field, or ``model_args.KEY`` for an argument of the model's builder. Checking the
space before the first trial means a typo is an error naming the file and the key, not a failed sweep.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from bloodcell.errors import BloodcellError
from bloodcell.io import read_json
from bloodcell.training.config import TrainConfig

# The default sweep: the recommended recipe's optimisation settings, around their defaults.
DEFAULT_SPACE: dict[str, dict] = {
    "lr": {"type": "float", "low": 1e-4, "high": 1e-2, "log": True},
    "weight_decay": {"type": "float", "low": 1e-6, "high": 1e-3, "log": True},
    "batch_size": {"type": "categorical", "choices": [32, 64, 128]},
    "label_smoothing": {"type": "float", "low": 0.0, "high": 0.2},
    "augment": {"type": "categorical", "choices": ["flip", "dihedral"]},
}

_FIELDS = {f.name for f in dataclasses.fields(TrainConfig)}
# Fields that define what is compared or where it runs, so a trial must not draw them.
_FIXED = {"model", "data", "size", "data_dir", "seed", "epochs", "threads", "device", "precision", "sync_bn",
          "model_args", "train_limit"}
_KEYS = {"float": {"type", "low", "high", "log", "step"}, "int": {"type", "low", "high", "log", "step"},
         "categorical": {"type", "choices"}}


def load_space(path: str | Path | None) -> dict[str, dict]:
    """The space in ``path`` (JSON), or the default one; checked before any trial runs."""
    if path is None:
        return check_space(DEFAULT_SPACE, "default space")
    return check_space(read_json(path), str(path))


def check_space(space, where: str) -> dict[str, dict]:
    if not isinstance(space, dict) or not space:
        raise BloodcellError(f"{where}: a search space is a non-empty JSON object of parameter: distribution")
    for name, dist in space.items():
        if name.startswith("model_args."):
            if not name[len("model_args."):]:
                raise BloodcellError(f"{where}: '{name}' names no model argument")
        elif name not in _FIELDS:
            raise BloodcellError(f"{where}: '{name}' is not a training-config field (see 'bloodcell train "
                                 "--help'), nor model_args.KEY")
        elif name in _FIXED:
            raise BloodcellError(f"{where}: '{name}' is fixed for a study (give it as an option), not searched")
        if not isinstance(dist, dict) or dist.get("type") not in _KEYS:
            raise BloodcellError(f"{where}: '{name}' needs a \"type\" of float, int or categorical")
        extra = sorted(set(dist) - _KEYS[dist["type"]])
        if extra:
            raise BloodcellError(f"{where}: '{name}' ({dist['type']}) has unknown key(s) {', '.join(extra)}")
        if dist["type"] == "categorical":
            if not isinstance(dist.get("choices"), list) or not dist["choices"]:
                raise BloodcellError(f"{where}: '{name}' needs a non-empty list of choices")
        else:
            low, high = dist.get("low"), dist.get("high")
            number = int if dist["type"] == "int" else (int, float)
            if not (isinstance(low, number) and isinstance(high, number)) or isinstance(low, bool) or low > high:
                raise BloodcellError(f"{where}: '{name}' needs numbers low <= high, not {low!r}, {high!r}")
            if dist.get("log") and low <= 0:
                raise BloodcellError(f"{where}: '{name}' is log-scaled, so low must be positive, not {low}")
    return space


def sample_params(trial, space: dict[str, dict]) -> dict:
    """One trial's parameters, drawn by the study's sampler."""
    out = {}
    for name, d in space.items():
        if d["type"] == "categorical":
            out[name] = trial.suggest_categorical(name, d["choices"])
        elif d["type"] == "int":
            out[name] = trial.suggest_int(name, d["low"], d["high"], step=d.get("step", 1), log=d.get("log", False))
        else:
            out[name] = trial.suggest_float(name, d["low"], d["high"], step=d.get("step"), log=d.get("log", False))
    return out


def apply_params(base: TrainConfig, params: dict) -> TrainConfig:
    """``base`` with a trial's parameters on top (``model_args.KEY`` into the model's arguments), checked."""
    fields = {k: v for k, v in params.items() if not k.startswith("model_args.")}
    model_args = {**base.model_args, **{k[len("model_args."):]: v for k, v in params.items()
                                        if k.startswith("model_args.")}}
    if isinstance(fields.get("lr"), int):
        fields["lr"] = float(fields["lr"])
    return dataclasses.replace(base, **fields, model_args=model_args).validate("trial")
