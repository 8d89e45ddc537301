"""The service hardened by default (issue 11), black box: ``dicom-dispatch serve`` as a process.

The API of the embedded server answers no one without its auth string and no other web origin;
its Prefect server is restarted when killed under load and no case stays claimed; a full disk or
a stop with a send hanging leaves every case whole, unclaimed and accounted for; the block-secret
key leaves the database with the secrets still readable.
"""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import stat
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import psutil
import pytest

from blocks.dicom import DicomTarget
from blocks.folder import FolderTarget
from tasks.taskjson import read_task_raw
from tests.cases import make_case
from tests.dispatch_env import DispatchEnv
from tests.peers.tmpfs import small_tmpfs
from tests.service import (
    free_port,
    run_as_client,
    run_cli,
    silent_peer,
    start_serve,
    stop,
    wait_for,
)
from tests.system.test_serve import start_embedded_serve

EVIL_ORIGIN = "http://evil.example"


def request(
    url: str, method: str = "GET", headers: dict[str, str] | None = None, body: bytes | None = None
) -> tuple[int, dict[str, str], bytes]:
    req = urllib.request.Request(url, data=body, method=method, headers=headers or {})  # noqa: S310
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:  # noqa: S310 - loopback
            return resp.status, {k.lower(): v for k, v in resp.headers.items()}, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, {k.lower(): v for k, v in exc.headers.items()}, exc.read()


def basic(auth: str) -> dict[str, str]:
    import base64

    return {"Authorization": "Basic " + base64.b64encode(auth.encode()).decode()}


def prefect_server_child(proc: subprocess.Popen[bytes]) -> psutil.Process:
    for child in psutil.Process(proc.pid).children(recursive=True):
        try:
            with_cmd = " ".join(child.cmdline())
        except psutil.Error:  # gone, or a killed one not reaped yet
            continue
        if "prefect" in with_cmd and "server" in with_cmd and "start" in with_cmd:
            return child
    raise AssertionError("no prefect server child")


def whereabouts(home: Path, cases: list[Path], api: str, auth: str, log: Path) -> str:
    """Where each unfinished case is, its dispatch record, the tag limits and the service's
    warnings: what a timed-out wait needs to be understood from CI's output alone."""
    lines = []
    for case in cases:
        for folder in ("outgoing", "error"):
            found = home / folder / case.name
            if found.is_dir():
                marks = sorted(p.name for p in found.iterdir() if p.name.startswith("."))
                try:
                    record = read_task_raw(found).get("dispatch")
                except Exception as exc:
                    record = f"unreadable: {exc}"
                lines.append(f"{folder}/{case.name} {marks} dispatch={record}")
    try:
        code, _, body = request(f"{api}/v2/concurrency_limits/filter", "POST", basic(auth), b"{}")
    except OSError as exc:
        code, body = 0, str(exc).encode()
    if code == 200:
        for limit in json.loads(body):
            lines.append(f"limit {limit['name']}: {limit['active_slots']}/{limit['limit']}")
    else:
        lines.append(f"tag limits unreadable: HTTP {code} {body[:200]!r}")
    worth = [
        line
        for line in log.read_text(errors="replace").splitlines()
        if "WARNING" in line or "ERROR" in line or "Traceback" in line
    ]
    return "\n".join([*lines, "service warnings:", *worth[-60:]])


def restarts(home: Path) -> int | None:
    """Restarts of a running server, as ``server-state.json`` says; None while it is away."""
    try:
        state = json.loads((home / "server-state.json").read_text())
    except (OSError, ValueError):
        return None
    return int(state["restarts"]) if state.get("state") == "running" else None


def no_claims(folder: Path) -> bool:
    return not list(folder.glob("*/.processing"))


@pytest.mark.timeout(600)  # its own PostgreSQL and Prefect server, started three times
def test_embedded_service_locked_down_and_survives_its_server(tmp_path: Path) -> None:
    """SLOW (own PostgreSQL + Prefect server). Auth, CORS, private files; the server child
    SIGKILLed with cases in flight, twice, is restarted each time, every case reaches
    success/, none stays claimed, ``status`` shows the restarts; SIGTERM stops it all within
    15 s."""
    home = tmp_path / "home"
    port = free_port()
    proc, log, proc_env = start_embedded_serve(tmp_path, home, port)
    api = f"http://127.0.0.1:{port}/api"
    try:
        wait_for((home / "service.json").exists, 240, "service.json")
        auth = (home / "api-auth-string").read_text().strip()
        for secret in ("api-auth-string", "encryption-key"):
            assert stat.S_IMODE((home / secret).stat().st_mode) == 0o600, secret
        assert stat.S_IMODE(home.stat().st_mode) in (0o700, 0o711)
        wait_for(lambda: (home / "outgoing").is_dir(), 60, "the default folders")
        assert not (home / "outgoing").stat().st_mode & 0o066, "cases must not be listable"

        code, _, _ = request(f"{api}/block_documents/filter", "POST", body=b"{}")
        assert code == 401, "the API must refuse a request without the auth string"
        code, _, _ = request(f"{api}/block_documents/filter", "POST", basic(auth), b"{}")
        assert code == 200
        preflight = {"Access-Control-Request-Method": "POST"}
        _, headers, _ = request(
            f"{api}/block_documents/filter", "OPTIONS", {**preflight, "Origin": EVIL_ORIGIN}
        )
        assert "access-control-allow-origin" not in headers
        ui_origin = f"http://127.0.0.1:{port}"
        _, headers, _ = request(
            f"{api}/block_documents/filter", "OPTIONS", {**preflight, "Origin": ui_origin}
        )
        assert headers.get("access-control-allow-origin") == ui_origin
        _, _, body = request(f"http://127.0.0.1:{port}/ui-settings")
        assert json.loads(body)["auth"] == "BASIC", "the UI must ask for the auth string"

        # CLI commands find the service's record and its auth string by themselves.
        mercure = tmp_path / "mercure.json"
        mercure.write_text(json.dumps({"targets": {"null": {"target_type": "dummy"}}}))
        done = run_cli("import-config", str(mercure), env=proc_env)
        assert done.returncode == 0, done.stderr
        save_fast_retries(api, auth, home)

        cases = [make_case(home / "outgoing", ["null"]) for _ in range(20)]
        wait_for(lambda: any((home / "success").iterdir()), 60, "the first case sent")
        prefect_server_child(proc).kill()  # under load: the other cases are queued or running
        try:
            wait_for(lambda: restarts(home) == 1, 90, "the server restarted")
            # Killed again while new runs are starting: their engine blocks the service's
            # event loop on the API (see ServerSupervisor), which must not stop the restart.
            cases += [make_case(home / "outgoing", ["null"]) for _ in range(10)]
            time.sleep(1.0)
            prefect_server_child(proc).kill()
            wait_for(lambda: restarts(home) == 2, 90, "the server restarted again")
            wait_for(
                lambda: (
                    all((home / "success" / c.name).is_dir() for c in cases)
                    or any((home / "error").iterdir())
                ),
                240,
                "every case in success/ after the server restart",
            )
            assert not any((home / "error").iterdir()), "no case may fail for the restart"
        except AssertionError as exc:
            raise AssertionError(f"{exc}\n{whereabouts(home, cases, api, auth, log)}") from None
        assert no_claims(home / "outgoing")
        counted = {
            c.name: retries
            for c in cases
            if (retries := read_task_raw(home / "success" / c.name)["dispatch"].get("retries"))
        }
        assert not counted, f"the server's restart is not the cases' fault: {counted}"
        status = run_cli("status", "--json", env=proc_env)
        assert status.returncode == 0, status.stderr
        server = json.loads(status.stdout)["server"]
        assert server["state"] == "running", server
        assert server["restarts"] == 2, server

        proc.send_signal(signal.SIGTERM)
        started = time.monotonic()
        assert proc.wait(30) == 0, log.read_text()[-3000:]
        assert time.monotonic() - started < 15
    finally:
        if proc.poll() is None:
            stop(proc, log)
    assert not (home / "postgres" / "postmaster.pid").exists(), "PostgreSQL must be stopped"


def save_fast_retries(api: str, auth: str, home: Path) -> None:
    """Settings of the service under test: a case that failed is retried at once."""
    code = (
        "from blocks.settings import DispatcherSettings as S;"
        "S(retry_delay=0, retry_max=10, dispatcher_scan_interval=0.2)"
        ".save('default', overwrite=True)"
    )
    run_as_client(code, api, auth, home)


def test_sigterm_with_a_hung_send_exits_in_time(env: DispatchEnv, tmp_path: Path) -> None:
    """A send blocked on a peer that never answers: SIGTERM → the service exits within 15 s
    (default grace 10 s), the case is back in outgoing/, unclaimed, its attempt recorded."""
    with silent_peer() as (port, accepted):
        env.save_target(DicomTarget(ip="127.0.0.1", port=str(port), aet_target="NEVER"), "never")
        proc, log = start_serve(tmp_path)
        try:
            case = make_case(env.outgoing, ["never"])
            wait_for(lambda: bool(accepted) and (case / ".processing").exists(), 90, "the send")
            time.sleep(1)
            proc.send_signal(signal.SIGTERM)
            started = time.monotonic()
            code = proc.wait(30)
            took = time.monotonic() - started
        finally:
            if proc.poll() is None:
                proc.kill()
    assert code == 0, log.read_text()[-3000:]
    assert took < 15, f"serve took {took:.1f} s to stop"
    assert case.is_dir()
    assert not (case / ".processing").exists(), "the claim must be released"
    assert len(list(case.glob("*.dcm"))) == 3
    task = env.task(case)
    assert task["dispatch"]["retries"] == 1, "the aborted attempt must be recorded"


def fill(disk: Path, leave_pages: int = 1) -> Path:
    """Fill ``disk``, leaving ``leave_pages`` pages free (the next claim takes the last)."""
    filler = disk / "filler"
    with open(filler, "wb") as out:
        chunk = b"\0" * 65536
        try:
            while True:
                out.write(chunk)
                out.flush()
        except OSError:
            pass
    size = filler.stat().st_size
    os.truncate(filler, size - size % 4096 - 4096 * leave_pages)
    return filler


def test_disk_full_mid_case_leaves_nothing_stuck(env: DispatchEnv, tmp_path: Path) -> None:
    """task.json cannot be written (ENOSPC) in the middle of an attempt: the case stays whole
    and unclaimed in the queue, and is sent once there is room again."""
    with small_tmpfs(tmp_path / "disk", "2m") as disk:
        outgoing, success, error = disk / "outgoing", disk / "success", disk / "error"
        for folder in (outgoing, success, error):
            folder.mkdir()
        env.save_settings(
            outgoing_folder=str(outgoing), success_folder=str(success), error_folder=str(error)
        )
        env.save_target(FolderTarget(folder=str(tmp_path / "share")), "share")
        (outgoing / "HALT").touch()
        proc, log = start_serve(tmp_path)
        try:
            case = make_case(outgoing, ["share"], files=2)
            filler = fill(disk)
            (outgoing / "HALT").unlink()
            wait_for(lambda: "No space left" in log.read_text(), 90, "an attempt on the full disk")
            time.sleep(2)
            assert case.is_dir(), "the case must stay in the queue"
            assert len(list(case.glob("*.dcm"))) == 2, "nothing is lost"
            filler.unlink()
            wait_for(lambda: (success / case.name).is_dir(), 60, "the case sent after the disk")
            assert len(list((success / case.name).glob("*.dcm"))) == 2
            assert no_claims(outgoing)
            assert no_claims(success)
        finally:
            stop(proc, log)


def test_encryption_key_moves_out_of_the_database(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A database from before the upgrade (key stored in it, a secret encrypted with it): after
    the move the key is a 0600 file, the database holds none, and the secret still decrypts."""
    from prefect.blocks.system import Secret
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from deployments.service.encryption_key import KEY_ENV, KEY_FILE, ensure_encryption_key
    from tests.peers.prefect_server import running_prefect_server

    base, home = tmp_path / "db", tmp_path / "home"
    home.mkdir()
    monkeypatch.delenv(KEY_ENV, raising=False)
    with running_prefect_server(base, db="sqlite") as server:
        with temporary_settings(updates={PREFECT_API_URL: server.api_url}):
            Secret(value="s3cr3t-before").save("upgrade-check", overwrite=True)
            drain_events()
    database = base / "prefect.db"
    assert db_keys(database) == 1, "Prefect keeps its key in the database before the upgrade"

    monkeypatch.setenv("PREFECT_API_DATABASE_CONNECTION_URL", f"sqlite+aiosqlite:///{database}")
    ensure_encryption_key(home)
    key_file = home / KEY_FILE
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    assert os.environ[KEY_ENV] == key_file.read_text().strip()
    assert db_keys(database) == 0, "the database must no longer hold the key"

    with running_prefect_server(base, db="sqlite", env={KEY_ENV: os.environ[KEY_ENV]}) as server:
        with temporary_settings(updates={PREFECT_API_URL: server.api_url}):
            secret: Any = Secret.load("upgrade-check")
            assert secret.get() == "s3cr3t-before"
            Secret(value="written-after").save("after-upgrade", overwrite=True)
            assert Secret.load("after-upgrade").get() == "written-after"  # type: ignore[union-attr]
            drain_events()
    assert db_keys(database) == 0, "a server with the key file never stores one again"


def drain_events() -> None:
    """Ship this server's events before it stops (they would be retried against a dead one)."""
    from prefect.events.worker import EventsWorker

    EventsWorker.drain_all(timeout=5)


def db_keys(database: Path) -> int:
    with sqlite3.connect(database) as db:
        return int(
            db.execute(
                "SELECT count(*) FROM configuration WHERE key = 'ENCRYPTION_KEY'"
            ).fetchone()[0]
        )


def test_serve_refuses_an_open_external_api(tmp_path: Path) -> None:
    """An external API without an auth string: refused off loopback (exit 2), before any
    connection is tried."""
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_AUTH_STRING"}
    env.update({"DICOM_DISPATCH_HOME": str(tmp_path / "home")})
    env["PREFECT_API_URL"] = "http://192.0.2.1:4200/api"
    done = run_cli("serve", env=env, timeout=60)
    assert done.returncode == 2
    assert "PREFECT_API_AUTH_STRING" in done.stderr
