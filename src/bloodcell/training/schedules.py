"""Learning-rate schedules, as multipliers of the base rate per epoch index (0-based), and the per-step warm-up."""

from __future__ import annotations

import math


def lr_factor(schedule: str, epoch: int, epochs: int) -> float:
    """``paper``: what the paper's Keras code really ran. It meant lr*exp(-0.1 e) but fed the decayed rate
    back in, so it compounds to exp(-0.05 e (e+1)) and training all but stops after ~10 epochs.
    ``exp``: the intended exp(-0.1 e). ``cosine``: half a cosine from 1 to 0 over the run."""
    if schedule == "paper":
        return math.exp(-0.05 * epoch * (epoch + 1))
    if schedule == "exp":
        return math.exp(-0.1 * epoch)
    if schedule == "cosine":
        return 0.5 * (1 + math.cos(math.pi * epoch / epochs))
    if schedule == "constant":
        return 1.0
    raise ValueError(f"unknown schedule '{schedule}'")


def warmup_factor(progress: float, warmup_epochs: float) -> float:
    """Linear warm-up: ``progress`` (epochs done, counting the current step, e.g. 0.25 after a quarter of the
    first epoch) over ``warmup_epochs``, capped at 1. Early Adam/SGD steps on random weights are the largest and
    noisiest; a ramp keeps them from throwing the weights far before the statistics settle."""
    if warmup_epochs <= 0:
        return 1.0
    return min(1.0, progress / warmup_epochs)


def step_lr(base_lr: float, schedule: str, epoch: int, epochs: int, step: int, steps: int,
            warmup_epochs: float) -> float:
    """The learning rate of step ``step`` (0-based) of ``steps`` in ``epoch``: the per-epoch schedule times the
    per-step warm-up (which ends, at factor 1, after ``warmup_epochs``)."""
    return base_lr * lr_factor(schedule, epoch, epochs) * warmup_factor(epoch + (step + 1) / steps, warmup_epochs)
