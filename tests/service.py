"""How the tests run our programs as a site does: ``serve`` and the CLI as processes, waiting for
what they do, and the fake peers that only make sense around them (a peer that never answers).

One place, so that every test starts ``serve`` the same way (its own data directory and log, the
session server's API URL and auth string from the environment) and stops it the same way (SIGTERM,
exit code 0 within a minute), and so that a slow machine is allowed for in one spot.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

from tests.peers.net import free_port

__all__ = [
    "CLI",
    "REPO",
    "free_port",
    "run_as_client",
    "run_cli",
    "serve_env",
    "silent_peer",
    "start_serve",
    "stop",
    "wait_for",
]

REPO = Path(__file__).resolve().parents[1]
#: ``dicom-dispatch`` as users run it (the console script calls the same ``main``).
CLI = [sys.executable, "-m", "deployments.cli"]

T = TypeVar("T")


def wait_for(
    check: Callable[[], T],
    timeout: float,
    what: str,
    *,
    every: float = 0.2,
    show: Callable[[], Any] | None = None,
) -> T:
    """Poll ``check`` until it returns something true, and return that; after ``timeout``
    seconds the test fails, naming ``what`` (and ``show()``, if given, to say why)."""
    deadline = time.monotonic() + timeout
    while True:
        found = check()
        if found:
            return found
        if time.monotonic() >= deadline:
            detail = f": {show()}" if show is not None else ""
            raise AssertionError(f"timed out after {timeout} s waiting for {what}{detail}")
        time.sleep(every)


def serve_env(home: Path, environ: Mapping[str, str] | None = None, **env: str) -> dict[str, str]:
    """The environment of a ``serve`` or CLI process: ``environ`` (default this process's: the
    session server's API URL and auth string), the data directory ``home``, the Runner polling
    every second (a deployment run starts at once), then ``env``."""
    return {
        **(os.environ if environ is None else environ),
        "DICOM_DISPATCH_HOME": str(home),
        "PREFECT_RUNNER_POLL_FREQUENCY": "1",
        **env,
    }


def start_serve(
    folder: Path,
    *args: str,
    name: str = "serve",
    environ: Mapping[str, str] | None = None,
    popen: Mapping[str, Any] | None = None,
    **env: str,
) -> tuple[subprocess.Popen[bytes], Path]:
    """``dicom-dispatch serve *args`` as a process; returns it and its log ``folder/<name>.log``.

    Its data directory is ``folder/<name>`` unless ``env`` sets ``DICOM_DISPATCH_HOME``; the
    environment is :func:`serve_env`'s. ``popen`` adds arguments to ``subprocess.Popen`` (e.g.
    another user to run as).
    """
    log = folder / f"{name}.log"
    proc_env = serve_env(folder / name, environ, **env)
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [*CLI, "serve", *args],
            env=proc_env,
            stdout=out,
            stderr=subprocess.STDOUT,
            **(popen or {}),
        )
    return proc, log


def stop(proc: subprocess.Popen[bytes], log: Path, *, within: float = 60) -> None:
    """Stop ``serve`` as systemd does (SIGTERM): it must exit 0 within ``within`` seconds."""
    proc.send_signal(signal.SIGTERM)
    try:
        code = proc.wait(within)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(10)
        raise AssertionError(f"serve did not stop within {within:g} s of SIGTERM") from None
    assert code == 0, log.read_text(errors="replace")[-3000:]


def run_cli(
    *args: str,
    env: Mapping[str, str] | None = None,
    timeout: float = 120,
    **kwargs: Any,
) -> subprocess.CompletedProcess[str]:
    """``dicom-dispatch *args`` as a process, output captured as text; ``env`` default this
    process's environment."""
    return subprocess.run(
        [*CLI, *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=dict(os.environ if env is None else env),
        **kwargs,
    )


def run_as_client(code: str, api: str, auth: str, home: Path) -> None:
    """Python ``code`` in a process of its own, as a client of a ``serve`` that started its own
    server (``api``, its auth string ``auth``, its data directory ``home``): how a test saves
    settings and targets there, away from the session server this process uses."""
    env = {
        **os.environ,
        "PREFECT_API_URL": api,
        "PREFECT_API_AUTH_STRING": auth,
        "DICOM_DISPATCH_HOME": str(home),
    }
    done = subprocess.run(
        [CLI[0], "-c", code], env=env, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr


@contextmanager
def silent_peer() -> Iterator[tuple[int, list[socket.socket]]]:
    """A TCP peer that accepts connections and never answers a byte."""
    listener = socket.create_server(("127.0.0.1", 0))
    accepted: list[socket.socket] = []
    done = threading.Event()

    def accept() -> None:
        listener.settimeout(0.2)
        while not done.is_set():
            try:
                accepted.append(listener.accept()[0])
            except OSError:
                continue

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    try:
        yield listener.getsockname()[1], accepted
    finally:
        done.set()
        thread.join(2)
        for conn in accepted:
            conn.close()
        listener.close()
