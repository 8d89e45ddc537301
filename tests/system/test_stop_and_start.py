"""A stop is a stop, a start is a start: ``serve`` with its own server and PostgreSQL, black box.

SIGTERM under load ends every process of it (the dispatcher children, the Prefect server, the
database) within the promised 15 s, stop after stop, whatever Prefect still had queued; after
everything was SIGKILLed (a power cut, the OOM killer) with ``postmaster.pid`` left naming a
pid that now belongs to another live process, the next ``serve`` starts and dispatches.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import psutil
import pytest

from tests.cases import make_case
from tests.peers.net import free_port
from tests.service import CLI, silent_peer, start_serve, stop, wait_for
from tests.system.test_service_hardening import save_fast_retries

#: README's promise: from SIGTERM to the last process gone.
STOP_PROMISE = 15.0
ROUNDS = 3


def serve_process(args: list[str], env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    """``serve args`` in the data directory ``env`` names, logging to ``log``."""
    home = env["DICOM_DISPATCH_HOME"]
    return start_serve(log.parent, *args, name=log.stem, environ=env, DICOM_DISPATCH_HOME=home)[0]


def every_process(proc: subprocess.Popen[bytes], home: Path) -> list[psutil.Process]:
    """``serve``, its children (dispatchers, Prefect server) and its PostgreSQL (pg_ctl starts
    it detached, so it is no child)."""
    tree = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
    try:
        postmaster = int((home / "postgres" / "postmaster.pid").read_text().split()[0])
        tree.append(psutil.Process(postmaster))
    except (OSError, ValueError, IndexError, psutil.NoSuchProcess):
        pass
    return tree


def running_after(processes: list[psutil.Process], deadline: float) -> list[psutil.Process]:
    """Those still running at ``deadline`` (a killed process whose parent is gone may stay a
    zombie until init reaps it: it runs no more)."""

    def running(process: psutil.Process) -> bool:
        try:
            return process.status() != psutil.STATUS_ZOMBIE
        except psutil.Error:
            return False

    while (left := [p for p in processes if running(p)]) and time.monotonic() < deadline:
        time.sleep(0.1)
    return left


def describe(process: psutil.Process) -> str:
    try:
        return f"{process.pid} {' '.join(process.cmdline())[:160]}"
    except psutil.Error:
        return str(process.pid)


def sent(home: Path, cases: list[Path]) -> int:
    return sum((home / "success" / c.name).is_dir() for c in cases)


@pytest.mark.timeout(600)  # its own PostgreSQL and Prefect server, started ROUNDS + 2 times
def test_every_stop_in_time_and_a_start_after_a_kill(tmp_path: Path) -> None:
    """SLOW. ROUNDS stops of ``serve --workers 2`` with cases in flight (one send hanging on a
    peer that never answers), each with every process gone within 15 s; then everything
    SIGKILLed, ``postmaster.pid`` naming this test's own pid: the next start dispatches."""
    home = tmp_path / "home"
    port = free_port()
    api = f"http://127.0.0.1:{port}/api"
    proc_env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_API")}
    proc_env.update({"DICOM_DISPATCH_HOME": str(home), "PREFECT_HOME": str(home / "prefect")})
    took: list[float] = []
    with silent_peer() as (never_port, accepted):
        for round_ in range(ROUNDS):
            log = tmp_path / f"serve-{round_}.log"
            (home / "service.json").unlink(missing_ok=True)
            proc = serve_process(["--port", str(port), "--workers", "2"], proc_env, log)
            try:
                wait_for((home / "service.json").exists, 240, f"round {round_}: the service")
                if round_ == 0:
                    first_setup(tmp_path, home, proc_env, api, never_port)
                hanging = len(accepted)
                cases = [make_case(home / "outgoing", ["null"]) for _ in range(30)]
                cases.append(make_case(home / "outgoing", ["never"]))
                wait_for(lambda c=cases: sent(home, c) >= 3, 90, f"round {round_}: cases sent")
                wait_for(lambda h=hanging: len(accepted) > h, 60, f"round {round_}: a send hanging")
                tree = every_process(proc, home)
                names = {p.pid: describe(p) for p in tree}
                proc.send_signal(signal.SIGTERM)
                started = time.monotonic()
                late = running_after(tree, started + STOP_PROMISE)
                running_after(late, started + 60)  # cleanup; the assertion below says why
                took.append(time.monotonic() - started)
                assert not late, (
                    f"round {round_}: running {STOP_PROMISE} s after SIGTERM: "
                    f"{[names[p.pid] for p in late]}\n{log.read_text()[-3000:]}"
                )
                assert proc.wait(5) == 0, log.read_text()[-3000:]
            finally:
                if proc.poll() is None:
                    proc.kill()
    print(f"stop times: {', '.join(f'{t:.1f} s' for t in took)}")  # shown with -s / -rP
    assert max(took) < STOP_PROMISE, f"stop times {took}"

    # Everything killed; the pid in postmaster.pid now belongs to another live process.
    log = tmp_path / "serve-killed.log"
    proc = serve_process(["--port", str(port)], proc_env, log)
    try:
        wait_for((home / "service.json").exists, 240, "the service before the kill")
        for process in every_process(proc, home):
            process.kill()
        proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
    pid_file = home / "postgres" / "postmaster.pid"
    lines = pid_file.read_text().splitlines()
    pid_file.write_text("\n".join([str(os.getpid()), *lines[1:]]) + "\n")
    (home / "service.json").unlink(missing_ok=True)

    log = tmp_path / "serve-after-kill.log"
    proc = serve_process(["--port", str(port)], proc_env, log)
    try:
        case = make_case(home / "outgoing", ["null"])
        wait_for(
            lambda: (home / "success" / case.name).is_dir() or proc.poll() is not None,
            240,
            "a case sent after the restart",
        )
        assert (home / "success" / case.name).is_dir(), log.read_text()[-3000:]
    finally:
        if proc.poll() is None:
            stop(proc, log)


def first_setup(tmp_path: Path, home: Path, env: dict[str, str], api: str, port: int) -> None:
    """A target that sends at once, one whose peer never answers, retries at once."""
    mercure = tmp_path / "mercure.json"
    targets = {
        "null": {"target_type": "dummy"},
        "never": {"target_type": "dicom", "ip": "127.0.0.1", "port": str(port)},
    }
    targets["never"].update({"aet_target": "NEVER", "aet_source": "DISPATCH"})
    mercure.write_text(json.dumps({"targets": targets}))
    done = subprocess.run(
        [*CLI, "import-config", str(mercure)], env=env, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    save_fast_retries(api, (home / "api-auth-string").read_text().strip(), home)
