"""A process pool that outlives its calls, for CPU-bound protocol work (parallel C-STORE).

Pure-Python PDU encoding holds the GIL, so parallel associations need processes, not threads.
Processes come from a forkserver with the caller's module preloaded: ``fork`` straight from a
process running threads (Prefect's, pynetdicom's) can deadlock the child, and a fresh
interpreter per call costs ≈ 0.35 s of imports. The pool lives as long as the parent, so only
the first parallel call pays for starting it. Like every non-fork start method, it imports the
parent's ``__main__`` once per worker: scripts need the usual ``if __name__ == "__main__":``
guard. Prefect-free.
"""

from __future__ import annotations

import logging
import multiprocessing
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import Any, TypeVar

__all__ = ["SharedPool"]

LOGGER = logging.getLogger(__name__)

T = TypeVar("T")


class SharedPool:
    """A lazily started, growing pool of worker processes with ``preload`` imported."""

    def __init__(self, preload: str) -> None:
        self.preload = preload
        self._lock = threading.Lock()
        self._pool: ProcessPoolExecutor | None = None
        self._size = 0

    def _get(self, workers: int) -> ProcessPoolExecutor:
        """The pool, grown to at least ``workers`` processes."""
        with self._lock:
            if self._pool is None or self._size < workers:
                if self._pool is not None:
                    self._pool.shutdown(wait=False)
                context = multiprocessing.get_context("forkserver")
                context.set_forkserver_preload([self.preload])
                self._pool = ProcessPoolExecutor(max_workers=workers, mp_context=context)
                self._size = workers
            return self._pool

    def _forget(self, pool: ProcessPoolExecutor) -> None:
        with self._lock:
            if self._pool is pool:
                self._pool, self._size = None, 0
        pool.shutdown(wait=False, cancel_futures=True)

    def run_each(self, function: Callable[..., T], calls: Sequence[tuple[Any, ...]]) -> list[T]:
        """``function(*args)`` for every ``args`` of ``calls`` at once; one retry if a worker died.

        ``function`` should return its errors as values: an exception of one call is re-raised
        here, and the others' results are lost.
        """
        for attempt in (1, 2):
            pool = self._get(len(calls))
            try:
                futures = [pool.submit(function, *args) for args in calls]
                return [f.result() for f in futures]
            except BrokenProcessPool:
                self._forget(pool)
                if attempt == 2:
                    raise
                LOGGER.warning("A worker process died; restarting the pool and running again")
        raise AssertionError("unreachable")

    def shutdown(self) -> None:
        """Stop the workers (they are started again on the next call)."""
        with self._lock:
            if self._pool is not None:
                self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool, self._size = None, 0
