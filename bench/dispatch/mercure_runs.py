"""Running the mercure model (``mercure_model.py``) "tuned" and "as shipped", and what a
workload costs it: wall time, CPU of its own process and of its ``dcmsend`` children.

"As shipped" is mercure's own setting: its service files do not set ``TCP_NODELAY``, so its
``dcmsend`` (DCMTK ≥ 3.6.2) sends with Nagle on. "Tuned" adds ``TCP_NODELAY=1`` to the
environment, as our peers and our own ``dcmsend`` runs have it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from bench._common import stop_process

ROOT = Path(__file__).resolve().parents[2]
SETTINGS = {True: "tuned", False: "as shipped"}


@dataclass
class Model:
    """A running model and its folders (the ``CaseFolders`` that ``drop``/``wait_done`` take)."""

    proc: subprocess.Popen[str]
    outgoing: Path
    success: Path
    error: Path
    times: Path

    def cpu(self) -> tuple[float, float]:
        """CPU seconds so far: (its own process, its reaped ``dcmsend`` children)."""
        import psutil

        times = psutil.Process(self.proc.pid).cpu_times()
        return times.user + times.system, times.children_user + times.children_system

    def dcmsend_s(self, names: list[str]) -> list[float]:
        """The ``dcmsend`` wall seconds the model timed for these cases."""
        wanted = set(names)
        rows = [json.loads(line) for line in self.times.read_text().splitlines()]
        return [r["dcmsend_s"] for r in rows if r["case"] in wanted]


@contextmanager
def mercure_model(base: Path, port: int, binary: str, tuned: bool) -> Iterator[Model]:
    """The model's own folders below ``base`` and its process, stopped afterwards."""
    folders = {k: base / k for k in ("outgoing", "success", "error")}
    for folder in folders.values():
        folder.mkdir(parents=True, exist_ok=True)
    env = {k: v for k, v in os.environ.items() if k != "TCP_NODELAY"}
    if tuned:
        env["TCP_NODELAY"] = "1"
    times = base / "times.jsonl"
    args = [str(folders[k]) for k in ("outgoing", "success", "error")]
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "bench.dispatch.mercure_model",
            *args,
            str(port),
            binary,
            str(times),
        ],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        if proc.stdout.readline().strip() != "ready":
            raise RuntimeError("the mercure model did not start")
        yield Model(proc, folders["outgoing"], folders["success"], folders["error"], times)
    finally:
        stop_process(proc, 30)
