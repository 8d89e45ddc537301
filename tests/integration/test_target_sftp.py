"""dispatch_case to a real OpenSSH sshd over SFTP (paramiko), and import-config of SFTP/rsync."""

from __future__ import annotations

import asyncio
import json
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from blocks.rsync import RsyncTarget
from blocks.sftp import PART_SUFFIX, SftpTarget
from tests.cases import make_case
from tests.integration.conftest import DispatchEnv
from tests.peers.net import free_port
from tests.peers.sshd import SshServer

PASSWORD = "sftp-test-Pa55word"
WRONG_PASSWORD = "wrong-Pa55word"


@pytest.fixture(scope="module")
def sshd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SshServer]:
    with SshServer(tmp_path_factory.mktemp("sshd")) as server:
        yield server


def sftp_target(server: SshServer, folder: Path, **changes: object) -> SftpTarget:
    folder.mkdir(parents=True, exist_ok=True)
    return SftpTarget(folder=str(folder), **server.target_fields(**changes))


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


def test_case_arrives_with_complete_marker_last(
    env: DispatchEnv, sshd: SshServer, tmp_path: Path
) -> None:
    remote = tmp_path / "remote"
    env.save_target(sftp_target(sshd, remote), "Research_SFTP")
    case = make_case(env.outgoing, ["Research_SFTP"], files=4)
    (case / "sub").mkdir()
    (case / "sub" / "notes.txt").write_text("nested")
    expected = sent_files(case)

    result = env.dispatch(case)

    assert result["location"] == "success", result
    assert_arrived(remote / case.name, expected)
    assert (remote / case.name / "sub" / "notes.txt").read_text() == "nested"
    assert "task.json" in expected
    assert len(expected) == 5
    written = sshd.written(remote / case.name)
    assert written[-1] == str(remote / case.name / ".complete"), ".complete is written last"
    assert not any(p.endswith(".processing") for p in written), "the claim marker is never sent"
    assert not list((remote / case.name).glob(f"*{PART_SUFFIX}"))
    done = env.success / case.name
    assert env.task(done)["dispatch"]["status"]["Research_SFTP"]["state"] == "complete"


def test_file_filter_is_honoured(env: DispatchEnv, sshd: SshServer, tmp_path: Path) -> None:
    remote = tmp_path / "remote"
    env.save_target(sftp_target(sshd, remote, file_filter="*.tags, task.json"), "sftp_filtered")
    case = make_case(env.outgoing, ["sftp_filtered"], files=2)
    (case / "series.tags").write_text("{}")
    expected = {k: v for k, v in sent_files(case).items() if k.endswith(".dcm")}

    assert env.dispatch(case)["location"] == "success"
    assert_arrived(remote / case.name, expected)


def test_peer_down_fails_quickly_and_keeps_the_case(env: DispatchEnv, tmp_path: Path) -> None:
    env.save_settings(retry_max=5, retry_delay=600.0)
    down = SftpTarget(folder="/srv/in", user="nobody", host="127.0.0.1", port=free_port())
    env.save_target(down, "sftp_down")
    case = make_case(env.outgoing, ["sftp_down"])

    started = time.monotonic()
    result = env.dispatch(case)

    assert time.monotonic() - started < 15
    assert result["location"] == "outgoing"
    status = env.task(case)["dispatch"]["status"]["sftp_down"]
    assert status["state"] == "error"
    assert "sftp target sftp_down" in status["message"]
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
    env.save_target(sftp_target(sshd, remote, key_file=str(other_key)), "sftp_wrong_key")
    empty_known_hosts = tmp_path / "known_hosts"
    empty_known_hosts.touch()
    env.save_target(
        sftp_target(sshd, remote, known_hosts_file=str(empty_known_hosts)), "sftp_unknown_host"
    )
    case = make_case(env.outgoing, ["sftp_wrong_key", "sftp_unknown_host"])

    assert env.dispatch(case)["location"] == "outgoing"

    status = env.task(case)["dispatch"]["status"]
    assert "authentication failed" in status["sftp_wrong_key"]["message"]
    unknown = status["sftp_unknown_host"]["message"]
    assert f"[127.0.0.1]:{sshd.port}" in unknown
    assert "ssh-keyscan" in unknown
    assert "trust_on_first_use" in unknown
    assert not (remote / case.name).exists(), "nothing is sent to an unverified host"
    tested = sftp_target(sshd, remote, known_hosts_file=str(empty_known_hosts)).test_connection()
    assert tested["ping"] is True
    assert tested["loggedin"] is False
    assert "ssh-keyscan" in tested["err"]

    env.save_target(sftp_target(sshd, remote), "sftp_wrong_key")
    tofu = sftp_target(sshd, remote, known_hosts_file=str(empty_known_hosts))
    tofu.trust_on_first_use = True
    env.save_target(tofu, "sftp_unknown_host")
    assert env.dispatch(case)["location"] == "success"
    assert empty_known_hosts.read_text().split()[:3] == sshd.host_key_line.split()


def test_connection_test_keys(sshd: SshServer, tmp_path: Path) -> None:
    ok = sftp_target(sshd, tmp_path / "remote").test_connection()
    assert ok == {"ping": True, "loggedin": True, "err": ""}
    missing = SftpTarget(folder=str(tmp_path / "missing"), **sshd.target_fields())
    tested = missing.test_connection()
    assert tested["loggedin"] is False
    assert "does not exist" in tested["err"]
    down = SftpTarget(folder="/", user="u", host="127.0.0.1", port=free_port()).test_connection()
    assert down["ping"] is False
    assert down["loggedin"] is False


def test_retry_after_partial_delivery_resends_only_what_is_missing(
    env: DispatchEnv, sshd: SshServer, tmp_path: Path
) -> None:
    env.save_settings(retry_max=5, retry_delay=0.0)
    good, bad = tmp_path / "good", tmp_path / "bad"
    env.save_target(sftp_target(sshd, good), "sftp_good")
    env.save_target(sftp_target(sshd, bad), "sftp_bad")
    case = make_case(env.outgoing, ["sftp_good", "sftp_bad"], files=3)
    expected = sent_files(case)
    first, second, third = sorted(n for n in expected if n.endswith(".dcm"))
    blocker = bad / case.name / second / "blocker"  # a folder where a file must go
    blocker.mkdir(parents=True)

    assert env.dispatch(case)["location"] == "outgoing"

    status = env.task(case)["dispatch"]["status"]
    assert status["sftp_good"]["state"] == "complete"
    assert status["sftp_bad"]["state"] == "error"
    assert second in status["sftp_bad"]["message"]
    assert (bad / case.name / first).read_bytes() == expected[first], "a partial delivery"
    assert not (bad / case.name / ".complete").exists()
    good_writes = len(sshd.written(good))
    bad_writes = sshd.written(bad / case.name / f".{first}")

    shutil.rmtree(bad / case.name / second)
    assert env.dispatch(case)["location"] == "success"

    assert len(sshd.written(good)) == good_writes, "the complete target is not sent again"
    assert sshd.written(bad / case.name / f".{first}") == bad_writes, "nor a file that arrived"
    assert sshd.written(bad / case.name / f".{third}"), "the missing files are sent"
    assert_arrived(bad / case.name, expected)
    assert_arrived(good / case.name, expected)


def test_password_login(env: DispatchEnv, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    env.save_settings(retry_max=5, retry_delay=600.0)
    monkeypatch.setenv("HOME", str(tmp_path))  # no keys of this machine's user get in the way
    with SshServer(tmp_path / "sshd", password=PASSWORD) as server:
        remote = tmp_path / "remote"
        remote.mkdir()
        fields = server.target_fields(key_file=None)
        env.save_target(SftpTarget(folder=str(remote), password=PASSWORD, **fields), "sftp_by_pw")
        env.save_target(
            SftpTarget(folder=str(remote), password=WRONG_PASSWORD, **fields), "sftp_bad_pw"
        )
        case = make_case(env.outgoing, ["sftp_by_pw", "sftp_bad_pw"])
        expected = sent_files(case)

        assert env.dispatch(case)["location"] == "outgoing"

    status = env.task(case)["dispatch"]["status"]
    assert status["sftp_by_pw"]["state"] == "complete"
    assert_arrived(remote / case.name, expected)
    assert "authentication failed" in status["sftp_bad_pw"]["message"]
    assert PASSWORD not in (case / "task.json").read_text()


def test_import_config_imports_sftp_and_rsync_targets(env: DispatchEnv, tmp_path: Path) -> None:
    from blocks.registry import aload_target, forget_cached_targets
    from deployments.importer import import_mercure_config

    mercure = {
        "targets": {
            "remote_sftp": {
                "target_type": "sftp",
                "folder": "/srv/incoming",
                "user": "mercure",
                "host": "sftp.example",
                "password": "s3cret",
                "file_filter": "*.tags",
                "contact": "",
                "comment": "",
                "direction": "push",
            },
            "archive": {
                "target_type": "rsync",
                "folder": "/data/in",
                "user": "mercure",
                "host": "archive.example",
                "password": "",
                "run_on_complete": True,
                "port": 2222,
                "key_file": "~/.ssh/archive_ed25519",
            },
            "untyped_sftp": {"folder": "/in", "user": "u", "host": "h"},
        }
    }
    path = tmp_path / "mercure.json"
    path.write_text(json.dumps(mercure))

    report = asyncio.run(import_mercure_config(path))

    assert report.imported == {"remote_sftp": "sftp", "archive": "rsync", "untyped_sftp": "sftp"}
    assert not report.skipped
    assert not report.ignored_fields
    assert "s3cret" not in json.dumps(report.as_dict())
    forget_cached_targets()
    sftp = asyncio.run(aload_target("remote_sftp"))
    assert isinstance(sftp, SftpTarget)
    assert sftp.password is not None
    assert sftp.password.get_secret_value() == "s3cret"
    assert (sftp.port, sftp.known_hosts_file, sftp.trust_on_first_use) == (
        22,
        "~/.ssh/known_hosts",
        False,
    )
    assert "s3cret" not in repr(sftp)
    rsync = asyncio.run(aload_target("archive"))
    assert isinstance(rsync, RsyncTarget)
    assert rsync.run_on_complete
    assert rsync.port == 2222
    assert rsync.key_file == "~/.ssh/archive_ed25519"
