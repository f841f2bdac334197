"""The inference worker: one thread owns the model; requests queue jobs, and queued predictions share a pass.

Why one thread and a queue rather than a pool of model copies: on a CPU the forward pass already uses every core,
so two passes at once only contend; what pays is merging the images of concurrent requests into one larger batch
(``max_batch`` images, waiting at most ``max_wait_s`` for more once the queue is non-empty). The event loop only
awaits futures, so uploads, the page and ``/healthz`` stay responsive while the model runs.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bloodcell.prediction import Prediction


@dataclass
class _PredictJob:
    paths: list[Path]
    top_k: int
    future: Future = field(default_factory=Future)


@dataclass
class _CallJob:
    fn: Callable[[], Any]
    future: Future = field(default_factory=Future)


class InferenceWorker:
    """A daemon thread running ``predictor.predict_files`` on merged batches and other model calls in turn."""

    def __init__(self, predictor, max_batch: int = 64, max_wait_s: float = 0.005):
        self.predictor = predictor
        self.max_batch = max_batch
        self.max_wait_s = max_wait_s
        self.jobs: queue.Queue = queue.Queue()
        self.stats = {"passes": 0, "images": 0, "largest_pass": 0}
        self._thread = threading.Thread(target=self._run, name="bloodcell-inference", daemon=True)
        self._thread.start()

    def predict(self, paths: list[Path], top_k: int) -> Future:
        """A future of one ``Prediction`` per path, in order."""
        job = _PredictJob(list(paths), top_k)
        self.jobs.put(job)
        return job.future

    def call(self, fn: Callable[[], Any]) -> Future:
        """Run ``fn`` on the model's thread (e.g. Grad-CAM), so it never races a forward pass."""
        job = _CallJob(fn)
        self.jobs.put(job)
        return job.future

    def close(self) -> None:
        self.jobs.put(None)
        self._thread.join(timeout=10)

    def _run(self) -> None:
        pending: _PredictJob | _CallJob | None = None
        while True:
            job = pending or self.jobs.get()
            pending = None
            if job is None:
                return
            if isinstance(job, _CallJob):
                self._settle(job.future, job.fn)
                continue
            batch = [job]
            n = len(job.paths)
            deadline = time.monotonic() + self.max_wait_s
            while n < self.max_batch:
                try:
                    nxt = self.jobs.get(timeout=max(0.0, deadline - time.monotonic()))
                except queue.Empty:
                    break
                if not isinstance(nxt, _PredictJob) or n + len(nxt.paths) > self.max_batch:
                    pending = nxt  # runs next, on its own
                    break
                batch.append(nxt)
                n += len(nxt.paths)
            self._predict_batch(batch)

    def _predict_batch(self, batch: list[_PredictJob]) -> None:
        paths = [p for j in batch for p in j.paths]
        top_k = max(j.top_k for j in batch)
        try:
            results: list[Prediction] = self.predictor.predict_files(paths, top_k=top_k, batch_size=max(1, len(paths)))
        except BaseException as e:  # noqa: BLE001 - handed to every waiting request, which answers 500
            for j in batch:
                j.future.set_exception(e)
            return
        self.stats["passes"] += 1
        self.stats["images"] += len(paths)
        self.stats["largest_pass"] = max(self.stats["largest_pass"], len(paths))
        by_path = {r.path: r for r in results}
        for j in batch:
            out = []
            for p in j.paths:
                r = by_path.get(str(p)) or Prediction(str(p), None, "no result for this file")
                if r.top and len(r.top) > j.top_k:
                    r = Prediction(r.path, r.top[: j.top_k], r.error, r.warnings, r.flags)
                out.append(r)
            j.future.set_result(out)

    @staticmethod
    def _settle(future: Future, fn: Callable[[], Any]) -> None:
        try:
            future.set_result(fn())
        except BaseException as e:  # noqa: BLE001 - re-raised in the request that asked
            future.set_exception(e)
