"""The fast data path: whole splits as uint8 NCHW tensors, batches cut by index, augmented as a batch."""

from __future__ import annotations

import numpy as np
import torch

from bloodcell.data.store import PreparedData
from bloodcell.errors import BloodcellError


def to_uint8_nchw(images: np.ndarray) -> torch.Tensor:
    """NxHxWx3 uint8 array -> Nx3xHxW uint8 tensor in channels-last memory (no copy of pixel values)."""
    return torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2)


def channel_stats(images: torch.Tensor) -> tuple[list[float], list[float]]:
    """Per-channel mean and std of a uint8 NCHW tensor, in [0, 1] units."""
    x = images.float().div_(255)
    return x.mean(dim=(0, 2, 3)).tolist(), x.std(dim=(0, 2, 3)).tolist()


class Normalizer:
    """uint8 batch -> float in [0, 1] (the paper's scaling), optionally standardised per channel."""

    def __init__(self, mean: list[float] | None = None, std: list[float] | None = None):
        self.mean = torch.tensor(mean).view(1, -1, 1, 1) if mean else None
        self.std = torch.tensor(std).view(1, -1, 1, 1) if std else None

    def to(self, device) -> Normalizer:
        """The statistics on ``device``, so a batch made there is normalised there (no host round trip)."""
        if self.mean is not None:
            self.mean, self.std = self.mean.to(device), self.std.to(device)
        return self

    def __call__(self, batch: torch.Tensor) -> torch.Tensor:
        x = batch.float().div_(255).contiguous(memory_format=torch.channels_last)
        if self.mean is not None:
            x = (x - self.mean) / self.std
        return x


def augment_codes(n: int, kind: str, generator: torch.Generator) -> torch.Tensor:
    """One symmetry code per image (bit 0 h-flip, bit 1 v-flip, bit 2 transpose), drawn from the CPU generator so
    the draws, and a resumed or multi-process run, are the same on every device."""
    return torch.randint(0, 8 if kind == "dihedral" else 4, (n,), generator=generator)


def apply_augment(x: torch.Tensor, codes: torch.Tensor, kind: str) -> torch.Tensor:
    """The symmetries ``codes`` of each image of ``x``, as a batch: each image picks its flipped or unflipped
    version with ``torch.where`` (no boolean-mask indexing, which would make a GPU wait to learn the count)."""
    if kind == "none":
        return x
    r = codes.to(x.device, non_blocking=True).view(-1, 1, 1, 1)
    out = torch.where((r & 1).bool(), x.flip(3), x)
    out = torch.where((r & 2).bool(), out.flip(2), out)
    if kind == "dihedral":
        out = torch.where((r & 4).bool(), out.transpose(2, 3), out)
    return out


def augment_batch(x: torch.Tensor, kind: str, generator: torch.Generator) -> torch.Tensor:
    """Random flips (``flip``) or the 8 symmetries of the square (``dihedral``), per image, whole batch at once.

    Cells have no preferred orientation, so these change no label.
    """
    if kind == "none":
        return x
    return apply_augment(x, augment_codes(x.shape[0], kind, generator), kind)


def stratified_subset(labels: np.ndarray, limit: int, seed: int) -> np.ndarray:
    """Indices of about ``limit`` items keeping the class proportions (for quick smoke runs)."""
    if isinstance(limit, bool) or not isinstance(limit, (int, np.integer)) or limit < 1:
        raise BloodcellError(f"a subset limit must be a whole number >= 1, got {limit!r}")
    if len(labels) == 0:
        return np.zeros(0, dtype=np.int64)
    rng = np.random.default_rng(seed)
    keep = []
    frac = min(1.0, limit / len(labels))
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        keep.append(rng.permutation(idx)[: max(1, round(frac * len(idx)))])
    return np.sort(np.concatenate(keep))


def split_tensors(data: PreparedData, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    return to_uint8_nchw(data.images[split]), torch.from_numpy(data.labels[split])
