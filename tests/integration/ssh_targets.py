"""What the SFTP and rsync tests share: targets on the test sshd, what arrived at the far end,
and the scenarios both run against the same OpenSSH server (refused keys, a partial delivery,
password logins). Each test module keeps the assertions only its protocol can make.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import pytest

from blocks.sftp import SshTarget
from tests.cases import make_case
from tests.dispatch_env import DispatchEnv
from tests.peers.net import free_port
from tests.peers.sshd import SshServer

WRONG_PASSWORD = "wrong-Pa55word"

T = TypeVar("T", bound=SshTarget)


def ssh_target(kind: type[T], server: SshServer, folder: Path, **changes: object) -> T:
    """A ``kind`` target that reaches ``server`` with the client key and writes into ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    return kind(folder=str(folder), **server.target_fields(**changes))


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


def deliver_nested_case(env: DispatchEnv, remote: Path, name: str) -> tuple[Path, dict[str, bytes]]:
    """A case of four DICOM files and a subfolder's notes.txt to ``name``, a target writing into
    ``remote``: it must end in success/ with the target complete, every file arrived byte for
    byte, the subfolder's too. Returns the case (now in success/) and the files sent."""
    case = make_case(env.outgoing, [name], files=4)
    (case / "sub").mkdir()
    (case / "sub" / "notes.txt").write_text("nested")
    expected = sent_files(case)

    result = env.dispatch(case)

    assert result["location"] == "success", result
    assert_arrived(remote / case.name, expected)
    assert (remote / case.name / "sub" / "notes.txt").read_text() == "nested"
    done = env.success / case.name
    assert env.task(done)["dispatch"]["status"][name]["state"] == "complete"
    return done, expected


def case_with_tags(env: DispatchEnv, name: str) -> tuple[Path, dict[str, bytes]]:
    """A case of two DICOM files to ``name``, with a series.tags beside its task.json: both for a
    ``file_filter`` of "*.tags" and "task.json" to hold back. Returns the case and the files
    that must arrive (the DICOM files only)."""
    case = make_case(env.outgoing, [name], files=2)
    (case / "series.tags").write_text("{}")
    return case, {k: v for k, v in sent_files(case).items() if k.endswith(".dcm")}


def connection_test_failures(
    sshd: SshServer, tmp_path: Path, kind: type[SshTarget]
) -> tuple[dict[str, Any], dict[str, Any]]:
    """The connection test of a target whose folder is missing (it says so) and of one nobody
    listens for (no ping): both results, for the keys only one protocol has."""
    missing = kind(folder=str(tmp_path / "missing"), **sshd.target_fields()).test_connection()
    assert "does not exist" in missing["err"]
    down = kind(folder="/", user="u", host="127.0.0.1", port=free_port()).test_connection()
    assert down["ping"] is False
    return missing, down


def fail_fast_when_down(env: DispatchEnv, kind: type[SshTarget]) -> None:
    """A case to ``<type>_down``, where nothing listens: an error that names the target and the
    refused connection, within 15 s, the case kept whole."""
    prefix = kind.target_type
    env.save_settings(retry_max=5, retry_delay=600.0)
    down = kind(folder="/srv/in", user="nobody", host="127.0.0.1", port=free_port())

    status = env.dispatch_unreachable(down, f"{prefix}_down", within=15)

    assert f"{prefix} target {prefix}_down" in status["message"]
    assert "Connection refused" in status["message"]


def refuse_wrong_key_and_unknown_host(
    env: DispatchEnv,
    sshd: SshServer,
    tmp_path: Path,
    kind: type[SshTarget],
    *,
    login_key: str,
    known_hosts_name: str = "known_hosts",
) -> Path:
    """A key sshd won't accept and a host key nobody trusts: both refused with how to fix it,
    nothing sent; then the right key and ``trust_on_first_use`` deliver. Targets are named
    ``<type>_wrong_key`` and ``<type>_unknown_host``; ``login_key`` is the key of the connection
    test that says whether the login worked. Returns the known_hosts file, now filled."""
    prefix = kind.target_type
    wrong_key, unknown_host = f"{prefix}_wrong_key", f"{prefix}_unknown_host"
    env.save_settings(retry_max=5, retry_delay=600.0)
    remote = tmp_path / "remote"
    other_key = tmp_path / "other_key"
    shutil.copy(sshd.root / "ssh_host_ed25519_key", other_key)  # a valid key sshd won't accept
    other_key.chmod(0o600)
    env.save_target(ssh_target(kind, sshd, remote, key_file=str(other_key)), wrong_key)
    known_hosts = tmp_path / known_hosts_name
    known_hosts.touch()
    untrusted = ssh_target(kind, sshd, remote, known_hosts_file=str(known_hosts))
    env.save_target(untrusted, unknown_host)
    case = make_case(env.outgoing, [wrong_key, unknown_host])

    assert env.dispatch(case)["location"] == "outgoing"

    status = env.task(case)["dispatch"]["status"]
    assert "authentication failed" in status[wrong_key]["message"]
    unknown = status[unknown_host]["message"]
    assert f"[127.0.0.1]:{sshd.port}" in unknown
    assert "ssh-keyscan" in unknown
    assert "trust_on_first_use" in unknown
    assert not (remote / case.name).exists(), "nothing is sent to an unverified host"
    tested = ssh_target(kind, sshd, remote, known_hosts_file=str(known_hosts)).test_connection()
    assert tested["ping"] is True
    assert tested[login_key] is False
    assert "ssh-keyscan" in tested["err"]

    env.save_target(ssh_target(kind, sshd, remote), wrong_key)
    tofu = ssh_target(kind, sshd, remote, known_hosts_file=str(known_hosts))
    tofu.trust_on_first_use = True
    env.save_target(tofu, unknown_host)
    assert env.dispatch(case)["location"] == "success"
    return known_hosts


@dataclass
class PartialDelivery:
    """A case sent to ``<type>_good`` and to ``<type>_bad``, where a folder blocks the second
    file: the first dispatch leaves the good target complete and the bad one half delivered."""

    env: DispatchEnv
    case: Path
    good: Path
    bad: Path
    expected: dict[str, bytes]
    #: The case's DICOM files in sending order; the second one is blocked.
    names: tuple[str, str, str]
    #: The per-target status after the first dispatch.
    status: dict[str, Any]

    def unblock_and_resend(self) -> None:
        shutil.rmtree(self.bad / self.case.name / self.names[1])
        assert self.env.dispatch(self.case)["location"] == "success"

    def assert_both_complete(self) -> None:
        assert_arrived(self.bad / self.case.name, self.expected)
        assert_arrived(self.good / self.case.name, self.expected)


def deliver_partially(
    env: DispatchEnv, sshd: SshServer, tmp_path: Path, kind: type[SshTarget]
) -> PartialDelivery:
    prefix = kind.target_type
    env.save_settings(retry_max=5, retry_delay=0.0)
    good, bad = tmp_path / "good", tmp_path / "bad"
    env.save_target(ssh_target(kind, sshd, good), f"{prefix}_good")
    env.save_target(ssh_target(kind, sshd, bad), f"{prefix}_bad")
    case = make_case(env.outgoing, [f"{prefix}_good", f"{prefix}_bad"], files=3)
    expected = sent_files(case)
    first, second, third = sorted(n for n in expected if n.endswith(".dcm"))
    (bad / case.name / second / "blocker").mkdir(parents=True)  # a folder where a file must go

    assert env.dispatch(case)["location"] == "outgoing"

    status = env.task(case)["dispatch"]["status"]
    assert status[f"{prefix}_good"]["state"] == "complete"
    assert status[f"{prefix}_bad"]["state"] == "error"
    assert (bad / case.name / first).read_bytes() == expected[first], "a partial delivery"
    assert not (bad / case.name / ".complete").exists()
    return PartialDelivery(env, case, good, bad, expected, (first, second, third), status)


def log_in_with_password(
    env: DispatchEnv,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    kind: type[SshTarget],
    password: str,
    around_dispatch: Callable[[], AbstractContextManager[Any]] = nullcontext,
) -> None:
    """One case to ``<type>_by_pw`` (the right password: delivered) and ``<type>_bad_pw`` (a wrong
    one: refused), on an sshd that takes passwords; the password never reaches task.json.
    ``around_dispatch`` wraps the dispatch (e.g. to watch the processes it starts)."""
    prefix = kind.target_type
    env.save_settings(retry_max=5, retry_delay=600.0)
    monkeypatch.setenv("HOME", str(tmp_path))  # no keys of this machine's user get in the way
    with SshServer(tmp_path / "sshd", password=password) as server:
        remote = tmp_path / "remote"
        remote.mkdir()
        fields = server.target_fields(key_file=None)
        env.save_target(kind(folder=str(remote), password=password, **fields), f"{prefix}_by_pw")
        env.save_target(
            kind(folder=str(remote), password=WRONG_PASSWORD, **fields), f"{prefix}_bad_pw"
        )
        case = make_case(env.outgoing, [f"{prefix}_by_pw", f"{prefix}_bad_pw"])
        expected = sent_files(case)

        with around_dispatch():
            assert env.dispatch(case)["location"] == "outgoing"

    status = env.task(case)["dispatch"]["status"]
    assert status[f"{prefix}_by_pw"]["state"] == "complete"
    assert_arrived(remote / case.name, expected)
    assert "authentication failed" in status[f"{prefix}_bad_pw"]["message"]
    assert password not in (case / "task.json").read_text()
