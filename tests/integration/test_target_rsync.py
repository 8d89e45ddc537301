"""dispatch_case to a real OpenSSH sshd with the rsync binary over ssh."""

from __future__ import annotations

import os
import shutil
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from blocks.rsync import RsyncTarget
from tests.dispatch_env import DispatchEnv
from tests.integration.ssh_targets import (
    WRONG_PASSWORD,
    assert_arrived,
    case_with_tags,
    connection_test_failures,
    deliver_nested_case,
    deliver_partially,
    fail_fast_when_down,
    log_in_with_password,
    refuse_wrong_key_and_unknown_host,
    ssh_target,
)
from tests.peers.base import require_program
from tests.peers.sshd import SshServer

PASSWORD = "rsync-test-Pa55word"


@pytest.fixture(scope="module", autouse=True)
def _rsync_installed() -> None:
    require_program("rsync", "rsync")


def rsync_target(server: SshServer, folder: Path, **changes: object) -> RsyncTarget:
    return ssh_target(RsyncTarget, server, folder, **changes)


def completion_script(folder: Path, log: Path) -> None:
    """mercure_complete.sh that records whether .complete was there, then its arguments."""
    script = folder / "mercure_complete.sh"
    script.write_text(
        "#!/bin/sh\n"
        f'if [ -f "$1/.complete" ]; then echo complete >> "{log}"; fi\n'
        f'printf "%s\\n" "$@" >> "{log}"\n'
    )
    script.chmod(0o755)


def test_case_arrives_and_completion_script_gets_the_target_name(
    env: DispatchEnv, sshd: SshServer, tmp_path: Path
) -> None:
    remote, log = tmp_path / "remote", tmp_path / "script.log"
    env.save_target(rsync_target(sshd, remote, run_on_complete=True), "Archive_Rsync")
    completion_script(remote, log)

    case, _ = deliver_nested_case(env, remote, "Archive_Rsync")

    assert not (remote / case.name / ".processing").exists()
    assert log.read_text().splitlines() == ["complete", str(remote / case.name), "Archive_Rsync"]


def test_file_filter_and_missing_script(env: DispatchEnv, sshd: SshServer, tmp_path: Path) -> None:
    env.save_settings(retry_max=5, retry_delay=0.0)
    remote = tmp_path / "remote"
    target = rsync_target(sshd, remote, file_filter="*.tags,task.json", run_on_complete=True)
    env.save_target(target, "rsync_filtered")
    case, expected = case_with_tags(env, "rsync_filtered")

    assert env.dispatch(case)["location"] == "outgoing"
    message = env.task(case)["dispatch"]["status"]["rsync_filtered"]["message"]
    assert "mercure_complete.sh is missing or not executable" in message

    completion_script(remote, tmp_path / "script.log")
    assert env.dispatch(case)["location"] == "success"
    assert_arrived(remote / case.name, expected)


def test_peer_down_fails_quickly_and_keeps_the_case(env: DispatchEnv) -> None:
    fail_fast_when_down(env, RsyncTarget)


def test_wrong_key_and_unknown_host_key_are_refused_clearly(
    env: DispatchEnv, sshd: SshServer, tmp_path: Path
) -> None:
    known_hosts = refuse_wrong_key_and_unknown_host(
        env,
        sshd,
        tmp_path,
        RsyncTarget,
        login_key="ssh_connected",
        known_hosts_name="known hosts",  # a blank in the path, passed through -e intact
    )
    assert known_hosts.read_text().strip(), "the host key was recorded"
    remote = tmp_path / "remote"
    again = rsync_target(sshd, remote, known_hosts_file=str(known_hosts)).test_connection()
    assert again["ssh_connected"] is True, "and is trusted from now on without the setting"


def test_connection_test_keys(sshd: SshServer, tmp_path: Path) -> None:
    remote = tmp_path / "remote"
    ok = rsync_target(sshd, remote).test_connection()
    assert ok == {
        "ping": True,
        "ssh_connected": True,
        "folder_exists": True,
        "exec_script_exists": None,
        "err": "",
    }
    no_script = rsync_target(sshd, remote, run_on_complete=True).test_connection()
    assert no_script["exec_script_exists"] is False
    assert "mercure_complete.sh" in no_script["err"]
    missing, down = connection_test_failures(sshd, tmp_path, RsyncTarget)
    assert missing["folder_exists"] is False
    assert down["ssh_connected"] is None


def test_retry_after_partial_delivery_resends_only_what_is_missing(
    env: DispatchEnv, sshd: SshServer, tmp_path: Path
) -> None:
    sent = deliver_partially(env, sshd, tmp_path, RsyncTarget)
    first = sent.names[0]
    case, good, bad = sent.case, sent.good, sent.bad
    assert "rsync code 23" in sent.status["rsync_bad"]["message"], "a partial transfer"
    good_marker = (good / case.name / ".complete").stat().st_mtime_ns
    delivered = (bad / case.name / first).stat().st_ino

    sent.unblock_and_resend()

    assert (good / case.name / ".complete").stat().st_mtime_ns == good_marker, "not re-sent"
    assert (bad / case.name / first).stat().st_ino == delivered, "an arrived file is kept"
    sent.assert_both_complete()


def test_password_login_never_shows_the_password(
    env: DispatchEnv, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    if shutil.which("sshpass") is None:
        pytest.skip("sshpass not found (install the Debian package 'sshpass')")
    seen: set[str] = set()

    log_in_with_password(
        env, tmp_path, monkeypatch, RsyncTarget, PASSWORD, lambda: watch_processes(seen)
    )

    assert any("sshpass" in line for line in seen), "the password went through sshpass"
    assert not [line for line in seen if PASSWORD in line or WRONG_PASSWORD in line]


@contextmanager
def watch_processes(seen: set[str]) -> Iterator[None]:
    """Add to ``seen`` every process's command line and environment while the block runs (what
    ``ps`` and ``/proc`` show), polled from /proc."""
    stop = threading.Event()

    def poll() -> None:
        while not stop.is_set():
            for pid in filter(str.isdigit, os.listdir("/proc")):
                for part in ("cmdline", "environ"):
                    try:
                        raw = Path("/proc", pid, part).read_bytes()
                    except OSError:
                        continue
                    seen.add(raw.replace(b"\0", b" ").decode(errors="replace"))
            time.sleep(0.01)

    thread = threading.Thread(target=poll, daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(timeout=5)
