"""The fast data path: whole splits as uint8 NCHW tensors, batches cut by index, augmented as a batch.

A split stored as shards (larger than memory) is a ``ShardedImages`` instead: it is indexed like the tensor
(an index tensor in, a uint8 NCHW batch out) but reads only the rows asked for from the memory maps.
"""

from __future__ import annotations

import numpy as np
import torch

from bloodcell.data.shards import ShardedArray
from bloodcell.data.store import PreparedData
from bloodcell.errors import BloodcellError

STATS_CHUNK = 8192  # images per step when the channel statistics of a split on disk are summed


def to_uint8_nchw(images: np.ndarray) -> torch.Tensor:
    """NxHxWx3 uint8 array -> Nx3xHxW uint8 tensor in channels-last memory (no copy of pixel values)."""
    return torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2)


class ShardedImages:
    """A split on disk seen as a uint8 NCHW tensor: ``len``, ``shape``, and indexing by an index tensor, an
    array or a slice returns the batch as a uint8 tensor on ``device``, read from the memory-mapped shards
    (rows sorted for locality, then put back in the order asked). ``to`` and ``select`` are lazy."""

    dtype = torch.uint8

    def __init__(self, array: ShardedArray, device: torch.device | str = "cpu"):
        self.array = array
        self.device = torch.device(device)

    @property
    def shape(self) -> torch.Size:
        n, h, w, c = self.array.shape
        return torch.Size((n, c, h, w))

    def __len__(self) -> int:
        return len(self.array)

    def __repr__(self) -> str:
        return f"ShardedImages(shape={tuple(self.shape)}, device={self.device})"

    def numel(self) -> int:
        return int(np.prod(self.shape))

    def to(self, device: torch.device | str, non_blocking: bool = False) -> ShardedImages:
        """The same images, with batches delivered on ``device`` (nothing is read or moved now)."""
        return ShardedImages(self.array, device)

    def contiguous(self) -> ShardedImages:
        return self

    def select(self, indices: torch.Tensor | np.ndarray) -> ShardedImages:
        """A lazy subset (e.g. ``--train-limit``): nothing is read."""
        return ShardedImages(self.array.select(_host_index(indices)), self.device)

    def read(self, indices: torch.Tensor | np.ndarray | slice) -> torch.Tensor:
        """The rows at ``indices`` as a uint8 NCHW tensor on the host (safe to call from a reader thread)."""
        rows = self.array[indices] if isinstance(indices, slice) else self.array.take(_host_index(indices))
        return to_uint8_nchw(rows)

    def __getitem__(self, key) -> torch.Tensor:
        if isinstance(key, (int, np.integer)):
            return self.read(np.array([key]))[0].to(self.device)
        return self.read(key).to(self.device, non_blocking=True)

    def nhwc(self) -> np.ndarray:
        """The whole split in memory as NxHxWx3 (for steps that need every image at once, e.g. oversampling)."""
        return np.asarray(self.array)


def _host_index(indices) -> np.ndarray:
    if isinstance(indices, torch.Tensor):
        return indices.detach().cpu().numpy()
    return np.asarray(indices)


def as_nchw(images) -> torch.Tensor | ShardedImages:
    """A split's images as the model code indexes them: a NumPy array becomes a uint8 NCHW tensor, a split on
    disk a ``ShardedImages``; tensors pass through."""
    if isinstance(images, ShardedArray):
        return ShardedImages(images)
    if isinstance(images, np.ndarray):
        return to_uint8_nchw(images)
    return images


def channel_stats(images: torch.Tensor | ShardedImages) -> tuple[list[float], list[float]]:
    """Per-channel mean and std of a uint8 NCHW tensor, in [0, 1] units.

    A split on disk is summed in chunks in float64 (the whole split as floats would not fit), so its figures
    can differ from the in-memory float32 ones in the last digits."""
    if isinstance(images, ShardedImages):
        return _chunked_channel_stats(images)
    x = images.float().div_(255)
    return x.mean(dim=(0, 2, 3)).tolist(), x.std(dim=(0, 2, 3)).tolist()


def _chunked_channel_stats(images: ShardedImages) -> tuple[list[float], list[float]]:
    total = torch.zeros(3, dtype=torch.float64)
    squares = torch.zeros(3, dtype=torch.float64)
    for i in range(0, len(images), STATS_CHUNK):
        x = images.read(slice(i, i + STATS_CHUNK)).double().div_(255)
        total += x.sum(dim=(0, 2, 3))
        squares += x.square().sum(dim=(0, 2, 3))
    count = len(images) * images.shape[2] * images.shape[3]
    mean = total / count
    var = (squares - count * mean.square()) / max(count - 1, 1)  # unbiased, as torch.std
    return mean.tolist(), var.clamp_min(0).sqrt().tolist()


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


def split_tensors(data: PreparedData, split: str) -> tuple[torch.Tensor | ShardedImages, torch.Tensor]:
    """A split's images (a tensor, or ``ShardedImages`` for a split on disk) and its labels."""
    return as_nchw(data.images[split]), torch.from_numpy(data.labels[split])
