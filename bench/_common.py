"""What every benchmark needs: console lines, medians, a timed tool run, memory, a work folder.

The benchmarks import nothing heavy at module level (Prefect reads its environment once, on
import, and a benchmark sets that environment first), so neither does this module.
"""

from __future__ import annotations

import os
import resource
import shutil
import statistics
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any


def say(text: str = "") -> None:
    """One line on the console at once (a benchmark runs for minutes: show progress as it goes)."""
    print(text, flush=True)


def median(values: Sequence[float]) -> float:
    """The median, NaN for no values (a figure cut short still prints)."""
    return statistics.median(values) if values else float("nan")


def percentile(values: Sequence[float], q: float) -> float:
    """The nearest-rank ``q`` quantile (0..1), NaN for no values: with 10-25 runs an interpolated
    p95 would be a value nobody measured."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def max_overlap(spans: Sequence[tuple[float, float]]) -> int:
    """The most (start, end) spans open at one instant (an end before a start at the same
    instant): the concurrency a limit allowed, read back from what ran."""
    edges = sorted([(start, 1) for start, _ in spans] + [(end, -1) for _, end in spans])
    most = now = 0
    for _, step in edges:
        now += step
        most = max(most, now)
    return most


def fmt_runs(values: Sequence[float], scale: float = 1.0, digits: int = 2) -> str:
    """Every run, so a reader sees the spread behind a median."""
    return "[" + ", ".join(f"{v * scale:.{digits}f}" for v in values) + "]"


def timed_tool(args: Sequence[str], *, timeout: float = 600) -> float:
    """Wall seconds of one run of a DCMTK tool with ``TCP_NODELAY=1`` (as our peers run), the
    whole process timed as a site would; a failed run raises with the end of its stderr."""
    env = dict(os.environ, TCP_NODELAY="1")
    started = time.perf_counter()
    proc = subprocess.run(
        list(args), env=env, capture_output=True, text=True, timeout=timeout, check=False
    )
    elapsed = time.perf_counter() - started
    if proc.returncode != 0:
        name = Path(args[0]).name
        raise RuntimeError(f"{name} exited {proc.returncode}: {proc.stderr.strip()[-300:]}")
    return elapsed


def stop_process(proc: subprocess.Popen[Any], grace: float) -> None:
    """SIGTERM, then SIGKILL after ``grace`` seconds: what a benchmark started gets its own clean
    stop (as under systemd), yet one that hangs never hangs the benchmark."""
    proc.terminate()
    try:
        proc.wait(grace)
    except subprocess.TimeoutExpired:
        proc.kill()


def max_rss_mb() -> float:
    """This process's peak RSS over its lifetime, in MB (Linux reports ``ru_maxrss`` in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class RssSampler:
    """Peak RSS of this process, sampled every 50 ms while running (``max_rss_mb`` covers the
    whole lifetime, imports and data generation included; this covers one figure)."""

    def __init__(self) -> None:
        import psutil

        self._proc = psutil.Process()
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self._proc.memory_info().rss)
            self._stop.wait(0.05)

    def __enter__(self) -> RssSampler:
        self.peak = self._proc.memory_info().rss
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._proc.memory_info().rss)


@contextmanager
def work_dir(prefix: str, keep: bool = False) -> Iterator[Path]:
    """A fresh temporary folder for one run, removed afterwards unless ``keep`` (then named)."""
    work = Path(tempfile.mkdtemp(prefix=prefix))
    try:
        yield work
    finally:
        if keep:
            say(f"work directory kept: {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
