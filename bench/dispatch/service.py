"""The service as a new user runs it: ``import-config`` of a plain mercure.json, then
``dicom-dispatch serve`` on the embedded default (own data directory, embedded PostgreSQL).

The benchmark drives it only through the folders (case folders dropped into outgoing/, the
result read from success/) and measures from outside: wall times, the claim marker appearing,
and the RSS and CPU of the service's processes (the dispatcher process, the Prefect server and
PostgreSQL, which ``serve`` starts as its children).
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from bench._common import say, stop_process
from bench.dispatch.config import HOST, SCP_AET

CLI = [sys.executable, "-m", "deployments.cli"]
#: Target names in the imported mercure.json.
PACS = "pacs"
DUMMY = "dummy"


class CaseFolders(Protocol):
    """Where cases are dropped and where they end: the service's folders or mercure's."""

    outgoing: Path
    success: Path
    error: Path


@dataclass
class Service:
    """A running ``serve`` and the folders it dispatches."""

    proc: subprocess.Popen[bytes]
    home: Path
    api_url: str
    outgoing: Path
    success: Path
    error: Path
    staging: Path

    def processes(self) -> dict[str, list[int]]:
        """pids of the dispatcher process, the Prefect server (its tree) and PostgreSQL (the
        embedded postmaster runs detached: found by its pid file, with its backends)."""
        import psutil

        me = psutil.Process(self.proc.pid)
        out: dict[str, list[int]] = {"dispatcher": [me.pid], "Prefect server": [], "PostgreSQL": []}
        with contextlib.suppress(OSError, ValueError, psutil.Error):
            pid_file = self.home / "postgres" / "postmaster.pid"
            postmaster = psutil.Process(int(pid_file.read_text().split()[0]))
            out["PostgreSQL"] = [postmaster.pid, *(c.pid for c in postmaster.children())]
        for child in me.children(recursive=True):
            try:
                line = " ".join(child.cmdline())
                name = child.name()
            except psutil.Error:  # gone meanwhile (a dcmsend that finished)
                continue
            if child.pid in out["PostgreSQL"]:
                continue
            key = "PostgreSQL" if "postgres" in name else "Prefect server"
            if "multiprocessing" in line and "forkserver" in line:
                key = "dispatcher"  # the DIMSE sender pool is the dispatcher's
            if "dispatcher_child" in line or name == "dcmsend":
                key = "dispatcher"  # serve --workers N (N = the CPUs by default) and its sends
            out[key].append(child.pid)
        return out


def _cli(args: list[str], env: dict[str, str], timeout: float = 600) -> str:
    done = subprocess.run(
        [*CLI, *args], env=env, capture_output=True, text=True, timeout=timeout, check=False
    )
    if done.returncode != 0:
        raise RuntimeError(f"dicom-dispatch {' '.join(args)}: {done.stderr[-2000:]}")
    return done.stdout


def service_env(home: Path) -> dict[str, str]:
    env = {**os.environ, "DICOM_DISPATCH_HOME": str(home)}
    for key in ("PREFECT_HOME", "PREFECT_API_URL", "PREFECT_API_DATABASE_CONNECTION_URL"):
        env.pop(key, None)  # the embedded default: the data directory decides
    return env


@contextmanager
def running_service(
    base: Path, scp_port: int, access_log: bool = False, serve_args: Sequence[str] = ()
) -> Iterator[Service]:
    """``import-config`` of a mercure.json with a DICOM and a dummy target, then ``serve``.

    ``access_log``: the Prefect server logs at INFO, which includes uvicorn's line per request
    (in ``<home>/logs/prefect-server.log``): the only record of every request that reaches the
    server, whichever process sent it. It costs the server a log line per request. The console
    level this benchmark sets for itself is dropped too (Prefect's default, as a site runs it):
    the first automation action in the server re-applies Prefect's logging configuration, after
    which uvicorn's access lines go through Prefect's console handler, and a WARNING level
    there would silence them for the rest of the run."""
    from deployments.service.api import read_service_record
    from tests.peers.net import free_port

    home = base / "home"
    folders = {k: base / k for k in ("outgoing", "success", "error", "staging")}
    for folder in folders.values():
        folder.mkdir(parents=True, exist_ok=True)
    mercure = {
        "outgoing_folder": str(folders["outgoing"]),
        "success_folder": str(folders["success"]),
        "error_folder": str(folders["error"]),
        "targets": {
            PACS: {
                "target_type": "dicom",
                "ip": HOST,
                "port": str(scp_port),
                "aet_target": SCP_AET,
            },
            DUMMY: {"target_type": "dummy"},
        },
    }
    (base / "mercure.json").write_text(json.dumps(mercure))
    env = service_env(home)
    if access_log:
        env["PREFECT_SERVER_LOGGING_LEVEL"] = "INFO"
        env.pop("PREFECT_LOGGING_HANDLERS_CONSOLE_LEVEL", None)
    started = time.perf_counter()
    _cli(["import-config", str(base / "mercure.json")], env)
    say(f"    [import-config in {time.perf_counter() - started:.0f} s]")
    log = open(base / "serve.log", "wb")  # noqa: SIM115 - closed below
    proc = subprocess.Popen(
        [
            *CLI,
            "serve",
            "--port",
            str(free_port()),
            *serve_args,
        ],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        deadline = time.monotonic() + 300
        while "dispatching from" not in (base / "serve.log").read_text(errors="replace"):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(
                    "serve did not start: " + (base / "serve.log").read_text()[-3000:]
                )
            time.sleep(0.2)
        record = read_service_record(home)
        assert record is not None
        say(f"    [serve up in {time.perf_counter() - started:.0f} s, {record['api_url']}]")
        yield Service(
            proc,
            home,
            str(record["api_url"]),
            folders["outgoing"],
            folders["success"],
            folders["error"],
            folders["staging"],
        )
    finally:
        stop_process(proc, 90)
        log.close()


@dataclass
class ProcessSampler:
    """Peak RSS per group of the service's processes, sampled every 0.1 s; CPU seconds used.

    RSS is summed over a group's processes, so PostgreSQL's shared buffers count once per
    backend: an upper bound."""

    service: Service
    peak_mb: dict[str, float] = field(default_factory=dict)
    cpu_s: dict[str, float] = field(default_factory=dict)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None
    _cpu_start: dict[str, float] = field(default_factory=dict)

    def _measure(self) -> tuple[dict[str, float], dict[str, float]]:
        import psutil

        rss: dict[str, float] = {}
        cpu: dict[str, float] = {}
        for group, pids in self.service.processes().items():
            rss[group] = cpu[group] = 0.0
            for number, pid in enumerate(pids):
                try:
                    proc = psutil.Process(pid)
                    rss[group] += proc.memory_info().rss / 2**20
                    times = proc.cpu_times()
                    cpu[group] += times.user + times.system
                    if number == 0:  # the group's root: its exited children (dcmsend, backends)
                        cpu[group] += times.children_user + times.children_system
                except psutil.Error:
                    pass
        return rss, cpu

    def _run(self) -> None:
        while not self._stop.wait(0.1):
            try:
                rss, _ = self._measure()
            except Exception:  # a process that ended between listing and reading
                continue
            for group, value in rss.items():
                self.peak_mb[group] = max(self.peak_mb.get(group, 0.0), value)

    def __enter__(self) -> ProcessSampler:
        _, self._cpu_start = self._measure()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        _, end = self._measure()
        self.cpu_s = {k: end[k] - self._cpu_start.get(k, 0.0) for k in end}


def drop(case: Path, outgoing: Path) -> Path:
    """Move a finished case folder into outgoing/ (as a script or mercure's router does)."""
    return case.rename(outgoing / case.name)


def wait_done(service: CaseFolders, names: list[str], timeout: float) -> float:
    """Wait until every case is in success/ or error/; the time it happened (perf_counter)."""
    pending = set(names)
    deadline = time.perf_counter() + timeout
    while pending:
        pending = {
            n
            for n in pending
            if not (service.success / n).is_dir() and not (service.error / n).is_dir()
        }
        if time.perf_counter() > deadline:
            raise RuntimeError(f"{len(pending)} case(s) not done after {timeout:.0f} s")
        time.sleep(0.005)
    return time.perf_counter()


def one_at_a_time(folders: CaseFolders, cases: list[Path], seed: int = 20) -> list[float]:
    """Ready (moved into outgoing/) → success/ seconds of each case, dropped alone: the next one
    only after the last has arrived and a random pause of 0.3-1.3 s, so that the drops fall
    anywhere in a 1 s scan cycle (as real arrivals do) and no run's tail overlaps the next."""
    rng = random.Random(seed)  # the same pauses for every side measured
    walls = []
    for case in cases:
        started = time.perf_counter()
        drop(case, folders.outgoing)
        walls.append(wait_done(folders, [case.name], 120) - started)
        if (folders.error / case.name).is_dir():
            raise RuntimeError(f"case {case.name} ended in error/")
        time.sleep(rng.uniform(0.3, 1.3))
    return walls
