"""The typed description of a training run, saved beside its results so the run can be repeated."""

from __future__ import annotations

import dataclasses
from dataclasses import asdict, dataclass, field
from pathlib import Path

from bloodcell.errors import BloodcellError
from bloodcell.io import read_json, write_json

SCHEDULES = ("paper", "exp", "cosine", "constant")
AUGMENTS = ("none", "flip", "dihedral")
BALANCES = ("none", "augment", "smote", "class-weight")
OPTIMIZERS = ("adam", "adamw", "sgd")
PRECISIONS = ("fp32", "bf16")


@dataclass
class TrainConfig:
    """Everything that decides a run's result. ``bloodcell train --help`` explains each option."""

    model: str = "se-cnn"
    model_args: dict = field(default_factory=dict)
    data: str = "bloodmnist"
    size: int = 64
    data_dir: str | None = None
    epochs: int = 20
    batch_size: int = 64
    seed: int = 0
    optimizer: str | None = None  # None: the model's paper default (Adam, or SGD for Inception/ResNet)
    lr: float = 1e-3
    momentum: float = 0.0
    weight_decay: float = 0.0
    schedule: str = "paper"
    normalize: bool = False  # subtract the training set's channel mean, divide by its std
    augment: str = "none"
    label_smoothing: float = 0.0
    balance: str = "none"  # oversample the training split ("augment", "smote") or weigh the loss ("class-weight")
    train_limit: int | None = None  # use only the first N training images (stratified), for smoke tests
    threads: int | None = None
    # "bf16": training forward passes under CPU bf16 autocast (fp32 master weights; validation and tests stay fp32).
    # About 3x faster for the big models on CPUs with AMX/AVX-512 BF16, far slower on CPUs without them.
    precision: str = "fp32"

    def validate(self) -> TrainConfig:
        if self.schedule not in SCHEDULES:
            raise BloodcellError(f"unknown schedule '{self.schedule}' (known: {', '.join(SCHEDULES)})")
        if self.augment not in AUGMENTS:
            raise BloodcellError(f"unknown augmentation '{self.augment}' (known: {', '.join(AUGMENTS)})")
        if self.balance not in BALANCES:
            raise BloodcellError(f"unknown balancing '{self.balance}' (known: {', '.join(BALANCES)})")
        if self.precision not in PRECISIONS:
            raise BloodcellError(f"unknown precision '{self.precision}' (known: {', '.join(PRECISIONS)})")
        if self.optimizer is not None and self.optimizer not in OPTIMIZERS:
            raise BloodcellError(f"unknown optimizer '{self.optimizer}' (known: {', '.join(OPTIMIZERS)})")
        if self.epochs < 1 or self.batch_size < 1 or self.lr <= 0:
            raise BloodcellError("epochs, batch size and learning rate must be positive")
        return self

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict, where: str = "config") -> TrainConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise BloodcellError(f"{where}: unknown config field(s) {', '.join(unknown)}")
        return cls(**d).validate()

    def save(self, path: str | Path) -> None:
        write_json(path, self.to_dict())

    @classmethod
    def load(cls, path: str | Path) -> TrainConfig:
        return cls.from_dict(read_json(path), str(path))
