"""Batches of a training split on disk, read one batch ahead in a background thread while the current one trains.

The epoch's permutation and batch boundaries are the loop's own, so the batches (and, with the augmentation codes
the loop draws, the results) are exactly those of the in-memory run. For in-memory tensors nothing changes: the
loop gets plain indexing back, with no per-batch work added.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager

import torch

import bloodcell.training.distributed as distributed
from bloodcell.data.tensors import ShardedImages
from bloodcell.training.distributed import Dist


class Prefetcher:
    """``take(idx)`` returns the rows of the next batch of ``batches``, read while the previous batch trained;
    reading the one after it starts before ``take`` waits, so one batch is always in flight."""

    def __init__(self, images: ShardedImages, batches: Iterable[torch.Tensor], ahead: int = 1):
        self.images = images
        self.batches: Iterator[torch.Tensor] = iter(batches)
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="bloodcell-prefetch")
        self.pending: deque[tuple[int, Future]] = deque()
        self.pin = images.device.type == "cuda"  # pinned host memory lets the copy to the GPU overlap
        for _ in range(ahead):
            self._submit()

    def _read(self, idx: torch.Tensor) -> torch.Tensor:
        x = self.images.read(idx)
        return x.pin_memory() if self.pin else x

    def _submit(self) -> None:
        idx = next(self.batches, None)
        if idx is not None:
            self.pending.append((len(idx), self.pool.submit(self._read, idx)))

    def take(self, idx: torch.Tensor) -> torch.Tensor:
        if not self.pending:
            raise RuntimeError("prefetcher: more batches taken than the epoch has")
        rows, future = self.pending.popleft()
        self._submit()
        if rows != len(idx):  # the loop and the reader walk the same batches; a mismatch is a bug, never data
            raise RuntimeError(f"prefetcher out of step: read {rows} rows for a batch of {len(idx)}")
        return future.result().to(self.images.device, non_blocking=True)

    def close(self) -> None:
        for _, future in self.pending:
            future.cancel()
        self.pending.clear()
        self.pool.shutdown(wait=True)


def epoch_batches(perm: torch.Tensor, starts: Iterable[int], batch_size: int, d: Dist) -> Iterator[torch.Tensor]:
    """This rank's indices of each batch the loop trains on (a last batch too small for every rank is left out,
    as the loop leaves it out)."""
    for i in starts:
        batch = perm[i : i + batch_size]
        if len(batch) >= d.world:
            yield distributed.shard(batch, d)


@contextmanager
def batch_reader(images, perm: torch.Tensor, starts: range, batch_size: int,
                 d: Dist) -> Iterator[Callable[[torch.Tensor], torch.Tensor]]:
    """The function that turns a batch's indices into its images: ``images.__getitem__`` for a tensor in memory,
    a ``Prefetcher`` over the same batches for a split on disk (its thread is stopped when the epoch ends)."""
    if not isinstance(images, ShardedImages):
        yield images.__getitem__
        return
    reader = Prefetcher(images, epoch_batches(perm.cpu(), starts, batch_size, d))
    try:
        yield reader.take
    finally:
        reader.close()
