"""``dicom-dispatch serve`` as a process: the loop dispatches, deployments run, SIGTERM is clean."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

from blocks.folder import FolderTarget
from tests.cases import make_case
from tests.integration.conftest import DispatchEnv
from tests.peers.net import free_port

CLI = [sys.executable, "-m", "deployments.cli"]


def wait_for(check: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def start_serve(tmp_path: Path, *args: str, **env: str) -> tuple[subprocess.Popen[bytes], Path]:
    """``dicom-dispatch serve`` on the session's Prefect server, its own data dir and log.

    The Runner polls every second, so a deployment run starts at once.
    """
    log = tmp_path / "serve.log"
    proc_env = {
        **os.environ,
        "DICOM_DISPATCH_HOME": str(tmp_path / "home"),
        "PREFECT_RUNNER_POLL_FREQUENCY": "1",
        **env,
    }
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [*CLI, "serve", *args], env=proc_env, stdout=out, stderr=subprocess.STDOUT
        )
    return proc, log


def stop(proc: subprocess.Popen[bytes], log: Path) -> None:
    proc.send_signal(signal.SIGTERM)
    try:
        code = proc.wait(60)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise AssertionError("serve did not stop within 60 s of SIGTERM") from None
    assert code == 0, log.read_text()[-3000:]


def test_serve_dispatches_and_serves_deployments(env: DispatchEnv, tmp_path: Path) -> None:
    env.save_target(FolderTarget(folder=str(tmp_path / "share")), "share")
    proc, log = start_serve(tmp_path)
    try:
        case = make_case(env.outgoing, ["share"])
        wait_for(lambda: (env.success / case.name).is_dir(), 90, "the loop to dispatch a case")

        from prefect.deployments import run_deployment

        env.save_settings(dispatcher_scan_interval=3600)  # only the deployment may dispatch now
        time.sleep(0.5)
        (env.outgoing / "HALT").touch()  # keeps the loop away; an explicit dispatch ignores it
        second = make_case(env.outgoing, ["share"])
        run = run_deployment(
            "dispatch_case/dispatch-case", parameters={"case": str(second)}, timeout=120
        )
        assert run.state is not None
        assert run.state.is_completed(), run.state
        assert (env.success / second.name).is_dir()

        # serve also executes background jobs (OpenREM's API) started by any Python program.
        from flows.background import run_in_background, wait_task

        job = run_in_background("tests.jobs_fixtures:quick", "serve-check")
        assert wait_task(job, timeout=120).completed_successfully
    finally:
        stop(proc, log)


def test_serve_embedded_default_stack(tmp_path: Path) -> None:
    """No PREFECT_API_URL: serve starts PostgreSQL and a Prefect server with a working UI."""
    home = tmp_path / "home"
    port = free_port()
    proc_env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_API")}
    proc_env.update({"DICOM_DISPATCH_HOME": str(home), "PREFECT_HOME": str(home / "prefect")})
    log = tmp_path / "serve.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [*CLI, "serve", "--port", str(port)], env=proc_env, stdout=out, stderr=subprocess.STDOUT
        )
    try:
        record_file = home / "service.json"
        wait_for(record_file.exists, 240, "service.json")
        record = json.loads(record_file.read_text())
        assert record["api_url"] == f"http://127.0.0.1:{port}/api"
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/ui-settings", timeout=10) as r:
            assert json.load(r)["api_url"] == f"http://127.0.0.1:{port}/api"
        assert (home / "postgres" / "PG_VERSION").exists()
        wait_for(lambda: (home / "outgoing").is_dir(), 60, "the default folders")

        # A CLI command finds the running service through its record (no ephemeral server).
        mercure = tmp_path / "mercure.json"
        mercure.write_text(json.dumps({"targets": {"null": {"target_type": "dummy"}}}))
        done = subprocess.run(
            [*CLI, "import-config", str(mercure)],
            env=proc_env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert done.returncode == 0, done.stderr
        case = make_case(home / "outgoing", ["null"])
        wait_for(lambda: (home / "success" / case.name).is_dir(), 90, "dispatch by the service")
    finally:
        stop(proc, log)
    assert not (home / "service.json").exists()
    assert not (home / "postgres" / "postmaster.pid").exists(), "PostgreSQL must be stopped"
