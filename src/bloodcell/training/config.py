"""The typed description of a training run, saved beside its results so the run can be repeated.

The defaults are the recommended recipe (what ``bloodcell train`` trains); the paper's settings are the
named preset ``paper`` (``--recipe paper``), which the paper's suites use.
"""

from __future__ import annotations

import dataclasses
from dataclasses import asdict, dataclass, field
from pathlib import Path

from bloodcell.choices import (
    AUGMENTS,
    BALANCES,
    DEVICES,
    MIXES,
    OPTIMIZERS,
    PRECISIONS,
    RECIPE_SETTINGS,
    SCHEDULES,
)
from bloodcell.errors import BloodcellError
from bloodcell.io import read_json, write_json

_R = RECIPE_SETTINGS["recommended"]  # the defaults below are the recommended recipe, read from its one source


@dataclass
class TrainConfig:
    """Everything that decides a run's result. ``bloodcell train --help`` explains each option."""

    model: str = "se-cnn"
    model_args: dict = field(default_factory=dict)
    data: str = "bloodmnist"
    size: int = 64
    data_dir: str | None = None
    epochs: int = _R["epochs"]
    batch_size: int = _R["batch_size"]
    seed: int = 0
    optimizer: str | None = _R["optimizer"]  # None: the model's paper default (Adam, or SGD for Inception/ResNet)
    lr: float = _R["lr"]
    momentum: float = _R["momentum"]
    weight_decay: float = _R["weight_decay"]
    schedule: str = _R["schedule"]
    normalize: bool = _R["normalize"]  # subtract the training set's channel mean, divide by its std
    augment: str = _R["augment"]
    label_smoothing: float = _R["label_smoothing"]
    # every BatchNorm's momentum; None: the model's own (Keras 0.01 for the paper's models). A model built with
    # --model-arg bn_momentum=X keeps X: the model's own argument is the more specific one.
    bn_momentum: float | None = _R["bn_momentum"]
    bn_recalibrate: int = _R["bn_recalibrate"]  # training images for BatchNorm statistics before validation; 0: off
    warmup_epochs: float = _R["warmup_epochs"]  # linear warm-up of the learning rate, per step, over N epochs
    ema: float = _R["ema"]  # decay of an exponential moving average of the weights (0: off); validated and saved
    mix: str = _R["mix"]  # mixup / cutmix of image pairs within each batch, with soft targets
    mix_alpha: float | None = _R["mix_alpha"]  # Beta(alpha, alpha) of the mix; None: choices.MIX_ALPHA's
    color_jitter: float = _R["color_jitter"]  # per-image brightness/contrast/saturation/hue jitter strength
    scale_jitter: float = _R["scale_jitter"]  # per-image random zoom in [1 - S, 1 + S]
    balance: str = _R["balance"]  # oversample the training split ("augment", "smote") or weigh the loss
    train_limit: int | None = None  # use only N training images (stratified), for smoke tests
    threads: int | None = None
    # "bf16"/"fp16": training forward passes under autocast (fp32 master weights; validation and tests stay
    # fp32; fp16 with a gradient scaler). bf16 is about 3x faster for the big models on CPUs with AMX/AVX-512
    # BF16 and far slower on CPUs without them.
    precision: str = "fp32"
    device: str = "auto"  # auto: cuda, then mps, then cpu
    sync_bn: bool = False  # multi-process runs: BatchNorm statistics over all ranks (SyncBatchNorm, CUDA only)
    pretrained: bool = False  # start from the library's ImageNet weights (torchvision/timm models only)
    init_from: str | None = None  # start from a run's best weights or a weights file (tensors that fit)
    teacher: str | None = None  # distil a run's or an ensemble's predictions into this model (training/distill.py)
    distill_alpha: float = 0.5  # weight of the teacher's soft targets; 1 - alpha is the labels'
    distill_temperature: float = 4.0  # softens both sides' probabilities before they are compared

    def validate(self, where: str = "config") -> TrainConfig:
        """Check every field's type and range; the error names the field."""
        _check_type(self, where)
        for name, allowed in (("schedule", SCHEDULES), ("augment", AUGMENTS), ("mix", MIXES), ("balance", BALANCES),
                              ("precision", PRECISIONS), ("device", DEVICES)):
            value = getattr(self, name)
            if (value.split(":")[0] if name == "device" else value) not in allowed:
                raise BloodcellError(f"{where}: {name} '{value}' is not one of {', '.join(allowed)}")
        if self.optimizer is not None and self.optimizer not in OPTIMIZERS:
            raise BloodcellError(f"{where}: optimizer '{self.optimizer}' is not one of {', '.join(OPTIMIZERS)}")
        for name in ("epochs", "batch_size", "size"):
            if getattr(self, name) < 1:
                raise BloodcellError(f"{where}: {name} must be at least 1, not {getattr(self, name)}")
        if self.bn_recalibrate < 0:
            raise BloodcellError(f"{where}: bn_recalibrate must be 0 (off) or a number of images, not "
                                 f"{self.bn_recalibrate}")
        for name in ("train_limit", "threads"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise BloodcellError(f"{where}: {name} must be at least 1, not {getattr(self, name)}")
        if not self.lr > 0:
            raise BloodcellError(f"{where}: lr must be positive, not {self.lr}")
        for name in ("momentum", "weight_decay"):
            if getattr(self, name) < 0:
                raise BloodcellError(f"{where}: {name} must not be negative, not {getattr(self, name)}")
        if self.bn_momentum is not None and not 0 < self.bn_momentum <= 1:
            raise BloodcellError(f"{where}: bn_momentum must be in (0, 1], not {self.bn_momentum}")
        if not 0 <= self.label_smoothing < 1:
            raise BloodcellError(f"{where}: label_smoothing must be in [0, 1), not {self.label_smoothing}")
        self._validate_recipe_options(where)
        if not self.model or not self.data:
            raise BloodcellError(f"{where}: model and data must be non-empty names")
        if "pretrained" in self.model_args:  # saved with the weights, it would make every load download them again
            raise BloodcellError(f"{where}: give --pretrained (the pretrained field), not --model-arg pretrained=...")
        if self.init_from is not None and not self.init_from.strip():
            raise BloodcellError(f"{where}: init_from must be a run folder or weights file, not an empty string")
        if self.teacher is not None and not self.teacher.strip():
            raise BloodcellError(f"{where}: teacher must be a run or ensemble folder, not an empty string")
        if self.teacher is not None and self.mix != "none":
            raise BloodcellError(f"{where}: teacher and mix '{self.mix}' cannot be combined: the teacher's targets are "
                                 "for the images as they are, not for mixed pairs")
        if not 0 <= self.distill_alpha <= 1:
            raise BloodcellError(f"{where}: distill_alpha must be in [0, 1], not {self.distill_alpha}")
        if not 0 < self.distill_temperature < float("inf"):
            raise BloodcellError(f"{where}: distill_temperature must be a positive number, not "
                                 f"{self.distill_temperature}")
        return self

    def _validate_recipe_options(self, where: str) -> None:
        """The ranges of warm-up, EMA, mix and jitter (each error names its field)."""
        if not 0 <= self.warmup_epochs <= self.epochs:
            raise BloodcellError(f"{where}: warmup_epochs must be in [0, epochs={self.epochs}], "
                                 f"not {self.warmup_epochs}")
        if not 0 <= self.ema < 1:
            raise BloodcellError(f"{where}: ema must be in [0, 1) (0 = off, e.g. 0.999), not {self.ema}")
        if self.mix_alpha is not None and not 0 < self.mix_alpha < float("inf"):
            raise BloodcellError(f"{where}: mix_alpha must be a positive number, not {self.mix_alpha}")
        if not 0 <= self.color_jitter <= 1:
            raise BloodcellError(f"{where}: color_jitter must be in [0, 1], not {self.color_jitter}")
        if not 0 <= self.scale_jitter < 1:
            raise BloodcellError(f"{where}: scale_jitter must be in [0, 1), not {self.scale_jitter}")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d, where: str = "config") -> TrainConfig:
        """A config from a saved dict: unknown, missing (of the fields every run has saved) or ill-typed fields
        are errors naming the field, never silent defaults."""
        if not isinstance(d, dict):
            raise BloodcellError(f"{where}: expected a JSON object of config fields, found {type(d).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise BloodcellError(f"{where}: unknown config field(s) {', '.join(unknown)}")
        missing = [k for k in SAVED_ALWAYS if k not in d]
        d = {**FIELDS_ADDED_LATER, **d}  # a run saved before a field existed trained with its old behaviour
        if missing:
            raise BloodcellError(f"{where}: config lacks field(s) {', '.join(missing)}")
        return cls(**d).validate(where)

    def save(self, path: str | Path) -> None:
        write_json(path, self.to_dict())

    @classmethod
    def load(cls, path: str | Path) -> TrainConfig:
        return cls.from_dict(read_json(path), str(path))


# Fields that every saved run has had since the first version: a config.json without one was edited or cut.
SAVED_ALWAYS = ("model", "data", "size", "epochs", "batch_size", "seed", "lr", "schedule", "augment")

# Fields added after runs had been saved, with the value that reproduces those runs (not today's default).
FIELDS_ADDED_LATER = {"bn_momentum": None, "bn_recalibrate": 0, "teacher": None, "distill_alpha": 0.5,
                      "distill_temperature": 4.0, "warmup_epochs": 0, "ema": 0.0, "mix": "none", "mix_alpha": None,
                      "color_jitter": 0.0, "scale_jitter": 0.0}

PRESETS = RECIPE_SETTINGS


def preset_config(recipe: str = "recommended", **fields) -> TrainConfig:
    """The named recipe with ``fields`` on top (e.g. the CLI's explicit options)."""
    if recipe not in PRESETS:
        raise BloodcellError(f"--recipe '{recipe}' is not one of {', '.join(PRESETS)}")
    return TrainConfig(**{**PRESETS[recipe], **fields}).validate()


_NUMBER = (int, float)
_TYPES = {"model": str, "model_args": dict, "data": str, "size": int, "data_dir": (str, type(None)),
          "epochs": int, "batch_size": int, "seed": int, "optimizer": (str, type(None)), "lr": _NUMBER,
          "momentum": _NUMBER, "weight_decay": _NUMBER, "schedule": str, "normalize": bool, "augment": str,
          "label_smoothing": _NUMBER, "bn_momentum": (int, float, type(None)), "bn_recalibrate": int,
          "balance": str, "warmup_epochs": _NUMBER, "ema": _NUMBER, "mix": str, "mix_alpha": (int, float, type(None)),
          "color_jitter": _NUMBER, "scale_jitter": _NUMBER,
          "train_limit": (int, type(None)),
          "threads": (int, type(None)), "precision": str, "device": str, "sync_bn": bool,
          "pretrained": bool, "init_from": (str, type(None)), "teacher": (str, type(None)),
          "distill_alpha": _NUMBER, "distill_temperature": _NUMBER}


def _check_type(cfg: TrainConfig, where: str) -> None:
    for f in dataclasses.fields(cfg):
        value, want = getattr(cfg, f.name), _TYPES[f.name]
        wants = want if isinstance(want, tuple) else (want,)
        if not isinstance(value, wants) or (isinstance(value, bool) and bool not in wants):  # True is an int
            names = "/".join("null" if t is type(None) else t.__name__ for t in wants)
            raise BloodcellError(f"{where}: field '{f.name}' must be {names}, not {value!r}")
