"""dispatch_case to a real OpenSSH sshd with the rsync binary over ssh."""

from __future__ import annotations

import json
import os
import shutil
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from blocks.rsync import RsyncTarget
from tests.cases import make_case
from tests.integration.conftest import DispatchEnv
from tests.peers.net import free_port
from tests.peers.sshd import SshServer

PASSWORD = "rsync-test-Pa55word"
WRONG_PASSWORD = "wrong-Pa55word"


@pytest.fixture(scope="module")
def sshd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SshServer]:
    if shutil.which("rsync") is None:
        message = "rsync not found (install the Debian package 'rsync')"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    with SshServer(tmp_path_factory.mktemp("sshd")) as server:
        yield server


def rsync_target(server: SshServer, folder: Path, **changes: object) -> RsyncTarget:
    folder.mkdir(parents=True, exist_ok=True)
    run_on_complete = bool(changes.pop("run_on_complete", False))
    return RsyncTarget(
        folder=str(folder), run_on_complete=run_on_complete, **server.target_fields(**changes)
    )


def sent_files(case: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in case.iterdir() if p.is_file() and p.name != ".lock"}


def assert_arrived(remote_case: Path, expected: dict[str, bytes]) -> None:
    """Every file byte for byte and nothing else; task.json as it was at sending time."""
    arrived = {p.name: p.read_bytes() for p in remote_case.iterdir() if p.is_file()}
    assert arrived.pop(".complete") == b""
    assert arrived.keys() == expected.keys()
    if "task.json" in expected:  # the dispatcher updates its status while sending
        case_id = json.loads(expected["task.json"])["id"]
        assert json.loads(arrived.pop("task.json"))["id"] == case_id
    assert arrived == {k: v for k, v in expected.items() if k != "task.json"}


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
    case = make_case(env.outgoing, ["Archive_Rsync"], files=4)
    (case / "sub").mkdir()
    (case / "sub" / "notes.txt").write_text("nested")
    expected = sent_files(case)

    result = env.dispatch(case)

    assert result["location"] == "success", result
    assert_arrived(remote / case.name, expected)
    assert (remote / case.name / "sub" / "notes.txt").read_text() == "nested"
    assert not (remote / case.name / ".processing").exists()
    assert log.read_text().splitlines() == ["complete", str(remote / case.name), "Archive_Rsync"]
    done = env.success / case.name
    assert env.task(done)["dispatch"]["status"]["Archive_Rsync"]["state"] == "complete"


def test_file_filter_and_missing_script(env: DispatchEnv, sshd: SshServer, tmp_path: Path) -> None:
    env.save_settings(retry_max=5, retry_delay=0.0)
    remote = tmp_path / "remote"
    target = rsync_target(sshd, remote, file_filter="*.tags,task.json", run_on_complete=True)
    env.save_target(target, "rsync_filtered")
    case = make_case(env.outgoing, ["rsync_filtered"], files=2)
    (case / "series.tags").write_text("{}")
    expected = {k: v for k, v in sent_files(case).items() if k.endswith(".dcm")}

    assert env.dispatch(case)["location"] == "outgoing"
    message = env.task(case)["dispatch"]["status"]["rsync_filtered"]["message"]
    assert "mercure_complete.sh is missing or not executable" in message

    completion_script(remote, tmp_path / "script.log")
    assert env.dispatch(case)["location"] == "success"
    assert_arrived(remote / case.name, expected)


def test_peer_down_fails_quickly_and_keeps_the_case(env: DispatchEnv) -> None:
    env.save_settings(retry_max=5, retry_delay=600.0)
    down = RsyncTarget(folder="/srv/in", user="nobody", host="127.0.0.1", port=free_port())
    env.save_target(down, "rsync_down")
    case = make_case(env.outgoing, ["rsync_down"])

    started = time.monotonic()
    result = env.dispatch(case)

    assert time.monotonic() - started < 15
    assert result["location"] == "outgoing"
    status = env.task(case)["dispatch"]["status"]["rsync_down"]
    assert status["state"] == "error"
    assert "rsync target rsync_down" in status["message"]
    assert "Connection refused" in status["message"]
    assert len(list(case.glob("*.dcm"))) == 3, "nothing is lost"
    assert not (case / ".processing").exists()


def test_wrong_key_and_unknown_host_key_are_refused_clearly(
    env: DispatchEnv, sshd: SshServer, tmp_path: Path
) -> None:
    env.save_settings(retry_max=5, retry_delay=600.0)
    remote = tmp_path / "remote"
    other_key = tmp_path / "other_key"
    shutil.copy(sshd.root / "ssh_host_ed25519_key", other_key)  # a valid key sshd won't accept
    other_key.chmod(0o600)
    env.save_target(rsync_target(sshd, remote, key_file=str(other_key)), "rsync_wrong_key")
    known_hosts = tmp_path / "known hosts"  # a blank in the path, passed through -e intact
    known_hosts.touch()
    env.save_target(
        rsync_target(sshd, remote, known_hosts_file=str(known_hosts)), "rsync_unknown_host"
    )
    case = make_case(env.outgoing, ["rsync_wrong_key", "rsync_unknown_host"])

    assert env.dispatch(case)["location"] == "outgoing"

    status = env.task(case)["dispatch"]["status"]
    assert "authentication failed" in status["rsync_wrong_key"]["message"]
    unknown = status["rsync_unknown_host"]["message"]
    assert f"[127.0.0.1]:{sshd.port}" in unknown
    assert "ssh-keyscan" in unknown
    assert "trust_on_first_use" in unknown
    assert not (remote / case.name).exists(), "nothing is sent to an unverified host"
    tested = rsync_target(sshd, remote, known_hosts_file=str(known_hosts)).test_connection()
    assert tested["ping"] is True
    assert tested["ssh_connected"] is False
    assert "ssh-keyscan" in tested["err"]

    env.save_target(rsync_target(sshd, remote), "rsync_wrong_key")
    tofu = rsync_target(sshd, remote, known_hosts_file=str(known_hosts))
    tofu.trust_on_first_use = True
    env.save_target(tofu, "rsync_unknown_host")
    assert env.dispatch(case)["location"] == "success"
    assert known_hosts.read_text().strip(), "the host key was recorded"
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
    missing = RsyncTarget(folder=str(tmp_path / "missing"), **sshd.target_fields())
    tested = missing.test_connection()
    assert tested["folder_exists"] is False
    assert "does not exist" in tested["err"]
    down = RsyncTarget(folder="/", user="u", host="127.0.0.1", port=free_port()).test_connection()
    assert down["ping"] is False
    assert down["ssh_connected"] is None


def test_retry_after_partial_delivery_resends_only_what_is_missing(
    env: DispatchEnv, sshd: SshServer, tmp_path: Path
) -> None:
    env.save_settings(retry_max=5, retry_delay=0.0)
    good, bad = tmp_path / "good", tmp_path / "bad"
    env.save_target(rsync_target(sshd, good), "rsync_good")
    env.save_target(rsync_target(sshd, bad), "rsync_bad")
    case = make_case(env.outgoing, ["rsync_good", "rsync_bad"], files=3)
    expected = sent_files(case)
    first, second, _ = sorted(n for n in expected if n.endswith(".dcm"))
    (bad / case.name / second / "blocker").mkdir(parents=True)  # a folder where a file must go

    assert env.dispatch(case)["location"] == "outgoing"

    status = env.task(case)["dispatch"]["status"]
    assert status["rsync_good"]["state"] == "complete"
    assert status["rsync_bad"]["state"] == "error"
    assert "rsync code 23" in status["rsync_bad"]["message"], "a partial transfer"
    assert (bad / case.name / first).read_bytes() == expected[first]
    assert not (bad / case.name / ".complete").exists()
    good_marker = (good / case.name / ".complete").stat().st_mtime_ns
    delivered = (bad / case.name / first).stat().st_ino

    shutil.rmtree(bad / case.name / second)
    assert env.dispatch(case)["location"] == "success"

    assert (good / case.name / ".complete").stat().st_mtime_ns == good_marker, "not re-sent"
    assert (bad / case.name / first).stat().st_ino == delivered, "an arrived file is kept"
    assert_arrived(bad / case.name, expected)
    assert_arrived(good / case.name, expected)


def test_password_login_never_shows_the_password(
    env: DispatchEnv, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    env.save_settings(retry_max=5, retry_delay=600.0)
    monkeypatch.setenv("HOME", str(tmp_path))  # no keys of this machine's user get in the way
    if shutil.which("sshpass") is None:
        pytest.skip("sshpass not found (install the Debian package 'sshpass')")
    with SshServer(tmp_path / "sshd", password=PASSWORD) as server:
        remote = tmp_path / "remote"
        remote.mkdir()
        fields = server.target_fields(key_file=None)
        env.save_target(RsyncTarget(folder=str(remote), password=PASSWORD, **fields), "rsync_by_pw")
        env.save_target(
            RsyncTarget(folder=str(remote), password=WRONG_PASSWORD, **fields), "rsync_bad_pw"
        )
        case = make_case(env.outgoing, ["rsync_by_pw", "rsync_bad_pw"])
        expected = sent_files(case)

        with watch_processes() as seen:
            assert env.dispatch(case)["location"] == "outgoing"

    assert any("sshpass" in line for line in seen), "the password went through sshpass"
    assert not [line for line in seen if PASSWORD in line or WRONG_PASSWORD in line]
    status = env.task(case)["dispatch"]["status"]
    assert status["rsync_by_pw"]["state"] == "complete"
    assert_arrived(remote / case.name, expected)
    assert "authentication failed" in status["rsync_bad_pw"]["message"]
    assert PASSWORD not in (case / "task.json").read_text()


@contextmanager
def watch_processes() -> Iterator[set[str]]:
    """Every process's command line and environment while the block runs (what ``ps`` and
    ``/proc`` show), polled from /proc."""
    seen: set[str] = set()
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
        yield seen
    finally:
        stop.set()
        thread.join(timeout=5)
