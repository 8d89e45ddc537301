"""dispatch_case to a real OpenSSH sshd over SFTP (paramiko), and import-config of SFTP/rsync."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from blocks.rsync import RsyncTarget
from blocks.sftp import PART_SUFFIX, SftpTarget
from tests.dispatch_env import DispatchEnv
from tests.integration.ssh_targets import (
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
from tests.peers.sshd import SshServer

PASSWORD = "sftp-test-Pa55word"


def sftp_target(server: SshServer, folder: Path, **changes: object) -> SftpTarget:
    return ssh_target(SftpTarget, server, folder, **changes)


def test_case_arrives_with_complete_marker_last(
    env: DispatchEnv, sshd: SshServer, tmp_path: Path
) -> None:
    remote = tmp_path / "remote"
    env.save_target(sftp_target(sshd, remote), "Research_SFTP")

    case, expected = deliver_nested_case(env, remote, "Research_SFTP")

    assert "task.json" in expected
    assert len(expected) == 5
    written = sshd.written(remote / case.name)
    assert written[-1] == str(remote / case.name / ".complete"), ".complete is written last"
    assert not any(p.endswith(".processing") for p in written), "the claim marker is never sent"
    assert not list((remote / case.name).glob(f"*{PART_SUFFIX}"))


def test_file_filter_is_honoured(env: DispatchEnv, sshd: SshServer, tmp_path: Path) -> None:
    remote = tmp_path / "remote"
    env.save_target(sftp_target(sshd, remote, file_filter="*.tags, task.json"), "sftp_filtered")
    case, expected = case_with_tags(env, "sftp_filtered")

    assert env.dispatch(case)["location"] == "success"
    assert_arrived(remote / case.name, expected)


def test_peer_down_fails_quickly_and_keeps_the_case(env: DispatchEnv) -> None:
    fail_fast_when_down(env, SftpTarget)


def test_wrong_key_and_unknown_host_key_are_refused_clearly(
    env: DispatchEnv, sshd: SshServer, tmp_path: Path
) -> None:
    known_hosts = refuse_wrong_key_and_unknown_host(
        env, sshd, tmp_path, SftpTarget, login_key="loggedin"
    )
    assert known_hosts.read_text().split()[:3] == sshd.host_key_line.split()


def test_connection_test_keys(sshd: SshServer, tmp_path: Path) -> None:
    ok = sftp_target(sshd, tmp_path / "remote").test_connection()
    assert ok == {"ping": True, "loggedin": True, "err": ""}
    missing, down = connection_test_failures(sshd, tmp_path, SftpTarget)
    assert missing["loggedin"] is False
    assert down["loggedin"] is False


def test_retry_after_partial_delivery_resends_only_what_is_missing(
    env: DispatchEnv, sshd: SshServer, tmp_path: Path
) -> None:
    sent = deliver_partially(env, sshd, tmp_path, SftpTarget)
    first, second, third = sent.names
    case, good, bad = sent.case, sent.good, sent.bad
    assert second in sent.status["sftp_bad"]["message"]
    good_writes = len(sshd.written(good))
    bad_writes = sshd.written(bad / case.name / f".{first}")

    sent.unblock_and_resend()

    assert len(sshd.written(good)) == good_writes, "the complete target is not sent again"
    assert sshd.written(bad / case.name / f".{first}") == bad_writes, "nor a file that arrived"
    assert sshd.written(bad / case.name / f".{third}"), "the missing files are sent"
    sent.assert_both_complete()


def test_password_login(env: DispatchEnv, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    log_in_with_password(env, tmp_path, monkeypatch, SftpTarget, PASSWORD)


def test_import_config_imports_sftp_and_rsync_targets(env: DispatchEnv) -> None:
    report = env.import_mercure_targets(
        {
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
    )

    assert report.imported == {"remote_sftp": "sftp", "archive": "rsync", "untyped_sftp": "sftp"}
    assert not report.skipped
    assert not report.ignored_fields
    assert "s3cret" not in json.dumps(report.as_dict())
    sftp = env.load_target("remote_sftp")
    assert isinstance(sftp, SftpTarget)
    assert sftp.password is not None
    assert sftp.password.get_secret_value() == "s3cret"
    assert (sftp.port, sftp.known_hosts_file, sftp.trust_on_first_use) == (
        22,
        "~/.ssh/known_hosts",
        False,
    )
    assert "s3cret" not in repr(sftp)
    rsync = env.load_target("archive")
    assert isinstance(rsync, RsyncTarget)
    assert rsync.run_on_complete
    assert rsync.port == 2222
    assert rsync.key_file == "~/.ssh/archive_ed25519"
