"""Test-time augmentation: the views of a batch, stacked into one batch for one forward pass.

The views are the group the training augmentation draws from (``choices.AUGMENTS``): ``flip`` = identity,
horizontal, vertical and both flips (4 views), ``dihedral`` = the 8 symmetries of the square. Cells have no
preferred orientation, so every view has the same label.
"""

from __future__ import annotations

import torch

from bloodcell.choices import TTA
from bloodcell.errors import BloodcellError

VIEWS = {"none": 1, "flip": 4, "dihedral": 8}
assert tuple(VIEWS) == TTA


def n_views(kind: str) -> int:
    if kind not in VIEWS:
        raise BloodcellError(f"unknown --tta '{kind}' ({', '.join(TTA)})")
    return VIEWS[kind]


def tta_views(x: torch.Tensor, kind: str) -> torch.Tensor:
    """NCHW batch -> (V*N)CHW: view ``v`` of image ``i`` at row ``v * N + i`` (so ``.view(V, N, ...)`` undoes it)."""
    n_views(kind)
    if kind == "none":
        return x
    flips = [x, x.flip(3), x.flip(2), x.flip(2).flip(3)]
    if kind == "dihedral":
        flips += [v.transpose(2, 3) for v in flips]
    return torch.cat(flips)
