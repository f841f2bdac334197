"""Learning-rate schedules, as multipliers of the base rate per epoch index (0-based)."""

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
