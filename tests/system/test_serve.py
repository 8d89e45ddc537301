"""``dicom-dispatch serve`` as a process: the loop dispatches, deployments run, SIGTERM is clean."""

from __future__ import annotations

import json
import os
import subprocess
import time
import urllib.request
from pathlib import Path

from blocks.folder import FolderTarget
from tests.cases import make_case
from tests.dispatch_env import DispatchEnv
from tests.integration.test_layout_refused import our_lines
from tests.integration.test_retention import make_sent
from tests.service import free_port, run_cli, start_serve, stop, wait_for


def start_embedded_serve(
    folder: Path, home: Path, port: int
) -> tuple[subprocess.Popen[bytes], Path, dict[str, str]]:
    """``serve`` of the default stack, as a user starts it: no PREFECT_API_URL, so it starts its
    own PostgreSQL and Prefect server (API on ``port``), all its data in ``home``. The process,
    its log (in ``folder``) and the environment a CLI command needs to find this service."""
    proc_env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_API")}
    proc_env.update({"DICOM_DISPATCH_HOME": str(home), "PREFECT_HOME": str(home / "prefect")})
    proc, log = start_serve(
        folder, "--port", str(port), environ=proc_env, DICOM_DISPATCH_HOME=str(home)
    )
    return proc, log, proc_env


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
    proc, log, proc_env = start_embedded_serve(tmp_path, home, port)
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
        done = run_cli("import-config", str(mercure), env=proc_env)
        assert done.returncode == 0, done.stderr
        case = make_case(home / "outgoing", ["null"])
        wait_for(lambda: (home / "success" / case.name).is_dir(), 90, "dispatch by the service")
    finally:
        stop(proc, log)
    assert not (home / "service.json").exists()
    assert not (home / "postgres" / "postmaster.pid").exists(), "PostgreSQL must be stopped"


def test_serve_logs_every_removal_with_the_case_id(env: DispatchEnv, tmp_path: Path) -> None:
    """README: "every removal is logged with the case id" — in ``serve``'s own output."""
    old = make_sent(env.success, "sent-long-ago", 7200)
    env.save_settings(
        cleaner_enabled=True,
        retention=3600,
        cleaner_scan_interval=0.5,
        offpeak_start="00:00",  # always off-peak
        offpeak_end="00:00",
    )
    proc, log = start_serve(tmp_path)
    try:
        wait_for(lambda: not old.exists(), 120, "the service's cleaner to remove the case")
        wait_for(lambda: "sent-long-ago" in log.read_text(), 10, "the removal in serve's log")
    finally:
        stop(proc, log)
    lines = [line for line in log.read_text().splitlines() if "sent-long-ago" in line]
    assert any("removed case sent-long-ago" in line for line in lines), lines


def test_serve_refuses_error_inside_success(env: DispatchEnv, tmp_path: Path) -> None:
    env.save_settings(error_folder=str(env.success / "error"))
    try:
        done = run_cli("serve", env={**os.environ, "DICOM_DISPATCH_HOME": str(tmp_path / "home")})
    finally:
        env.save_settings()
    assert done.returncode != 0
    (line,) = our_lines(done.stderr)
    assert "error_folder" in line, done.stderr[-2000:]
    assert "inside success_folder" in line
    assert "Traceback" not in done.stderr
    assert not (env.success / "error").exists(), "serve created the nested folder"
