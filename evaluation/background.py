"""Work beside the device: CPU steps of evaluation run in one background thread while the next case's
sliding window runs on the GPU (validation scoring in `SegmentationModule`, restoring and writing
predictions in `experiments.stages.predict.CaseWriter`).

One worker thread keeps the jobs in submission order, so what `collect` returns is what running each job
in turn would have given, in the same order; a job's error is raised there. `max_pending` bounds the jobs
waiting (each holds a case's arrays, possibly on the GPU): `submit` waits for the oldest beyond it.
With `enabled` False every job runs at once, in the caller's thread.
"""
from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor


class InOrderThread:
    def __init__(self, enabled: bool = True, max_pending: int = 2, name: str = "beside-device"):
        self.enabled, self.max_pending, self.name = enabled, max(1, int(max_pending)), name
        self._pool: ThreadPoolExecutor | None = None
        self._pending: dict[str, list[Future]] = {}
        self._done: dict[str, list] = {}

    def submit(self, key: str, fn: Callable, *args, **kwargs) -> None:
        """Run `fn(*args, **kwargs)` beside the caller; its result joins `key`'s results."""
        done = self._done.setdefault(key, [])
        if not self.enabled:
            done.append(fn(*args, **kwargs))
            return
        if self._pool is None:
            self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix=self.name)
        pending = self._pending.setdefault(key, [])
        pending.append(self._pool.submit(fn, *args, **kwargs))
        while len(pending) > self.max_pending:  # results of the oldest jobs, in order
            done.append(pending.pop(0).result())

    def collect(self, key: str) -> list:
        """The results of every job submitted under `key`, in submission order (waits for them). The thread
        ends once nothing is pending, also when a job raised (the error is raised here)."""
        pending, done = self._pending.pop(key, []), self._done.pop(key, [])
        try:
            for f in pending:
                done.append(f.result())
        finally:
            if not self._pending and self._pool is not None:
                self._pool.shutdown(wait=True, cancel_futures=True)
                self._pool = None
        return done
