"""The ``dicom-dispatch`` command line, run as users run it (a subprocess), exit codes included."""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

from blocks.folder import FolderTarget
from tests.cases import make_case
from tests.dispatch_env import DispatchEnv
from tests.service import CLI, run_cli


def test_help_and_usage_errors_start_no_server(tmp_path: Path) -> None:
    env = {**os.environ, "DICOM_DISPATCH_HOME": str(tmp_path / "home")}
    env.pop("PREFECT_API_URL", None)
    started = time.monotonic()
    ok = run_cli("--help", env=env, timeout=60)
    assert ok.returncode == 0
    assert "import-config" in ok.stdout
    bad = run_cli("frobnicate", env=env, timeout=60)
    assert bad.returncode == 2
    assert time.monotonic() - started < 20
    assert not (tmp_path / "home" / "postgres").exists(), "--help must not start a database"


def test_import_config_from_mercure_json(env: DispatchEnv, tmp_path: Path) -> None:
    mercure = {
        "outgoing_folder": str(env.outgoing),
        "success_folder": str(env.success),
        "error_folder": str(env.error),
        "retry_max": 4,
        "retry_delay": 60,
        "offpeak_start": "21:00",
        "offpeak_end": "05:30",
        "targets": {
            "PACS_Main": {
                "target_type": "dicom",
                "ip": "127.0.0.1",
                "port": "11112",
                "aet_target": "PACS",
                "aet_source": "MERCURE",
                "contact": "",
                "comment": "",
                "direction": "both",
            },
            "research_share": {
                "target_type": "folder",
                "folder": str(tmp_path / "share"),
                "file_filter": "*.tags",
            },
            "null_target": {"target_type": "dummy"},
            "remote_sftp": {
                "target_type": "sftp",
                "folder": "/x",
                "user": "u",
                "host": "h",
                "password": "secret",
            },
        },
        "rules": {
            "stroke": {"priority": "urgent", "target": "PACS_Main"},
            "nightly": {"priority": "offpeak"},
        },
    }
    path = tmp_path / "mercure.json"
    path.write_text(json.dumps(mercure))

    done = run_cli("import-config", str(path), "--json")

    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["imported"] == {
        "PACS_Main": "dicom",
        "research_share": "folder",
        "null_target": "dummy",
        "remote_sftp": "sftp",
    }
    assert report["settings"]["retry_max"] == 4
    assert report["settings"]["offpeak_start"] == "21:00"
    assert report["settings"]["rule_priorities"] == {"stroke": "urgent", "nightly": "offpeak"}

    listed = run_cli("targets", "list", "--json")
    assert listed.returncode == 0, listed.stderr
    names = {t["name"]: t for t in json.loads(listed.stdout)}
    assert names["PACS_Main"]["block"] == "pacs-main"
    assert names["PACS_Main"]["type"] == "dicom"
    assert "secret" not in done.stdout + listed.stdout

    # An imported DICOM target sends with the fastest correct backend, and says which.
    tested = run_cli("targets", "test", "PACS_Main")
    assert json.loads(tested.stdout)["backend"] == "dcmsend (auto)"
    status = json.loads(run_cli("status", "--json").stdout)
    assert status["backends"]["PACS_Main"] == "dcmsend (auto)"  # the server is shared


def test_import_config_refuses_names_that_share_a_slug(env: DispatchEnv, tmp_path: Path) -> None:
    path = tmp_path / "mercure.json"
    clash = {"PACS_Main": {"target_type": "dummy"}, "pacs-main": {"target_type": "dummy"}}
    path.write_text(json.dumps({"targets": clash}))
    done = run_cli("import-config", str(path))
    assert done.returncode == 1
    assert "pacs-main" in done.stderr
    assert "Traceback" not in done.stderr


def test_targets_test_exit_codes(env: DispatchEnv, tmp_path: Path) -> None:
    env.save_target(FolderTarget(folder=str(tmp_path)), "writable")
    env.save_target(FolderTarget(folder=str(tmp_path / "missing")), "missing")
    ok = run_cli("targets", "test", "writable")
    assert ok.returncode == 0, ok.stderr
    assert json.loads(ok.stdout) == {"Folder exists": True, "Folder is writeable": True}
    assert run_cli("targets", "test", "missing").returncode == 1
    unknown = run_cli("targets", "test", "no_such_target")
    assert unknown.returncode == 1
    assert "no_such_target" in unknown.stderr


def test_dispatch_sweep_halt_and_status(env: DispatchEnv, tmp_path: Path) -> None:
    env.save_target(FolderTarget(folder=str(tmp_path / "share")), "share")
    first = make_case(env.outgoing, ["share"])
    assert run_cli("dispatch", first.name).returncode == 0
    assert (env.success / first.name).is_dir()

    unknown = make_case(env.outgoing, ["nowhere"])
    assert run_cli("dispatch", str(unknown)).returncode == 1
    assert (env.error / unknown.name / "dispatch_error.txt").exists()

    assert run_cli("halt").returncode == 0
    assert (env.outgoing / "HALT").exists()
    held = make_case(env.outgoing, ["share"])
    status = run_cli("status", "--json")
    assert status.returncode == 0, status.stderr
    data = json.loads(status.stdout)
    assert data["halted"] is True
    assert data["outgoing"]["ready"] == 1
    assert run_cli("sweep").returncode == 0
    assert held.is_dir(), "HALT must stop the sweep"

    assert run_cli("unhalt").returncode == 0
    assert run_cli("sweep", "--until-empty").returncode == 0
    assert (env.success / held.name).is_dir()


def test_version_is_the_installed_package_version(tmp_path: Path) -> None:
    from importlib.metadata import version

    env = {**os.environ, "DICOM_DISPATCH_HOME": str(tmp_path / "home")}
    done = run_cli("--version", env=env, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == f"dicom-dispatch {version('dicom-dispatch')}"
    assert not (tmp_path / "home" / "postgres").exists(), "--version must not start a database"


def test_unreachable_api_is_one_line_and_exit_1(tmp_path: Path) -> None:
    dead_api = "http://127.0.0.1:9/api"  # port 9 (discard): nothing listens on loopback
    env = {**os.environ, "DICOM_DISPATCH_HOME": str(tmp_path / "home"), "PREFECT_API_URL": dead_api}
    for argv in (["targets", "list"], ["status", "--json"], ["jobs", "list"]):
        done = run_cli(*argv, env=env)
        assert done.returncode == 1, (argv, done.stderr)
        assert "Traceback" not in done.stderr, argv
        assert done.stderr.count("\n") == 1, done.stderr
        assert done.stderr.startswith("dicom-dispatch: cannot reach the Prefect API"), done.stderr
        assert dead_api in done.stderr
        assert done.stdout == ""


def test_halt_and_unhalt_json(env: DispatchEnv) -> None:
    halted = run_cli("halt", "--json")
    assert halted.returncode == 0, halted.stderr
    assert json.loads(halted.stdout) == {"halted": True, "file": str(env.outgoing / "HALT")}
    assert (env.outgoing / "HALT").exists()

    resumed = run_cli("unhalt", "--json")
    assert resumed.returncode == 0, resumed.stderr
    assert json.loads(resumed.stdout) == {"halted": False, "file": str(env.outgoing / "HALT")}
    assert not (env.outgoing / "HALT").exists()


def test_plain_output_when_not_a_terminal(env: DispatchEnv, tmp_path: Path) -> None:
    """Piped output stays plain, space-aligned columns, and no progress bar reaches stderr."""
    env.save_target(FolderTarget(folder=str(tmp_path / "share")), "share")
    listed = run_cli("targets", "list")
    assert listed.returncode == 0, listed.stderr
    header, *rows = listed.stdout.splitlines()
    assert header.split() == ["NAME", "TYPE", "BLOCK", "DIRECTION"]
    assert ["share", "folder", "share", "push"] in [r.split() for r in rows]

    case = make_case(env.outgoing, ["share"])
    swept = run_cli("sweep")
    assert swept.returncode == 0, swept.stderr
    assert swept.stdout == "dispatched 1, succeeded 1\n"
    assert swept.stderr == ""
    assert (env.success / case.name).is_dir()


def run_on_terminal(*args: str) -> tuple[subprocess.CompletedProcess[str], str]:
    """Run with stderr on a pseudo-terminal and stdout piped; also what the terminal showed."""
    import pty
    import threading

    master, slave = pty.openpty()
    chunks: list[bytes] = []

    def drain() -> None:
        while True:
            try:
                chunk = os.read(master, 4096)
            except OSError:  # the terminal closed with the last process holding it
                return
            if not chunk:
                return
            chunks.append(chunk)

    reader = threading.Thread(target=drain, daemon=True)
    reader.start()
    try:
        done = subprocess.run(
            [*CLI, *args], stdout=subprocess.PIPE, stderr=slave, text=True, timeout=120
        )
    finally:
        os.close(slave)
    reader.join(10)
    os.close(master)
    return done, b"".join(chunks).decode(errors="replace")


def test_sweep_and_dispatch_show_progress_on_a_terminal(env: DispatchEnv, tmp_path: Path) -> None:
    """stderr a terminal: a bar of cases (targets) done there; piped stdout reads as without."""
    env.save_target(FolderTarget(folder=str(tmp_path / "share")), "share")
    cases = [make_case(env.outgoing, ["share"]) for _ in range(2)]
    swept, terminal = run_on_terminal("sweep")
    assert swept.returncode == 0, terminal
    assert swept.stdout == "dispatched 2, succeeded 2\n"
    assert "sweep" in terminal
    assert "2/2" in terminal, terminal
    assert all((env.success / c.name).is_dir() for c in cases)

    case = make_case(env.outgoing, ["share"])
    dispatched, terminal = run_on_terminal("dispatch", case.name)
    assert dispatched.returncode == 0, terminal
    assert dispatched.stdout.startswith(f"{case.name}: success ")
    assert f"case {case.name}" in terminal, terminal
    assert "1/1" in terminal, terminal
