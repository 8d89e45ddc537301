"""A program ``serve`` starts, supervises and stops: the Prefect server, its services, Redis.

Each runs in a session of its own, so a stop reaches everything it started (uvicorn's worker
processes, multiprocessing's helpers) with one signal to its process group, and so a signal
sent to ``serve``'s terminal never reaches it behind ``serve``'s back. A leader that died (a
SIGKILL) may leave members of its group running, still holding its port: a stop kills what is
left of the group too, or the restart that follows would find the port taken.

Its variables (an auth string, a password) go to the child's environment only, never to its
command line (readable by every user in ``ps``) nor to this process's environment (inherited
by every job process).
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Protocol

import psutil

__all__ = ["READY_TIMEOUT", "ChildProcess", "Stoppable", "stop_all"]

#: Seconds a child may take to answer after its start (a first start migrates a database).
READY_TIMEOUT = 180.0


class ChildProcess:
    """One child program: started without waiting (:meth:`launch`), then awaited
    (:meth:`wait_ready`); :meth:`why_down` tells its supervisor whether it must be restarted."""

    #: How its supervisor and the log name it.
    name = "a child process"
    #: Its entry in ``server-state.json`` (``dicom-dispatch status``).
    key = "child"
    #: Other children hold connections to it: when it is restarted, they are restarted too.
    others_depend = False

    def __init__(self, log_file: Path, env: Mapping[str, str] | None = None) -> None:
        self.log_file = log_file
        self.env = dict(env or {})
        self.process: subprocess.Popen[bytes] | None = None

    def command(self) -> list[str]:
        raise NotImplementedError

    def environment(self) -> dict[str, str]:
        """This process's environment with the child's own variables on top."""
        return {**os.environ, **self.env}

    def ready(self) -> bool:
        """Whether it answers; by default, whether it runs."""
        return True

    def launch(self) -> None:
        """Start the child without waiting for it to answer."""
        env = self.environment()
        self.log_file.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_file, "ab") as log:
            self.process = subprocess.Popen(
                self.command(),
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )

    def start(self) -> None:
        self.launch()
        self.wait_ready()

    def wait_ready(self, timeout: float = READY_TIMEOUT) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process is not None and self.process.poll() is not None:
                raise RuntimeError(
                    f"{self.name} exited with code {self.process.returncode}; see {self.log_file}"
                )
            if self.ready():
                return
            time.sleep(0.3)
        raise RuntimeError(f"{self.name} did not become ready in {timeout:.0f} s")

    def why_down(self) -> str | None:
        """Why it must be restarted; None while it runs."""
        proc = self.process
        if proc is None or proc.poll() is not None:
            return f"{self.name} exited (code {proc.returncode if proc is not None else None})"
        return None

    def pids(self) -> list[int]:
        """Its process and every process it started, while it runs."""
        proc = self.process
        if proc is None or proc.poll() is not None:
            return []
        try:
            return [proc.pid, *(p.pid for p in psutil.Process(proc.pid).children(recursive=True))]
        except psutil.Error:
            return [proc.pid]

    def ask_to_stop(self) -> None:
        """SIGTERM to its group, without waiting."""
        if self.process is not None and self.process.poll() is None:
            self._signal_group(signal.SIGTERM)

    def stop(self, timeout: float = 20.0) -> None:
        """SIGTERM, ``timeout`` seconds to exit, then SIGKILL to whatever of its group is left."""
        proc = self.process
        if proc is None:
            return
        if proc.poll() is None:
            self._signal_group(signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout)
        # The leader, if it is still running, or what a killed leader left in its group.
        self._signal_group(signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(5)

    def _signal_group(self, sig: signal.Signals) -> None:
        if self.process is None:
            return
        # The group keeps the leader's pid as its id while any member lives, so the id cannot
        # name another process's group then; with no member left this finds none.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.process.pid, sig)


class Stoppable(Protocol):
    def ask_to_stop(self) -> None: ...

    def stop(self, timeout: float) -> None: ...


def stop_all(children: Iterable[Stoppable], timeout: float) -> None:
    """Stop several children at once: all are asked first, then each gets what is left of
    ``timeout``."""
    group = list(children)
    for child in group:
        child.ask_to_stop()
    deadline = time.monotonic() + timeout
    for child in group:
        child.stop(max(0.1, deadline - time.monotonic()))
