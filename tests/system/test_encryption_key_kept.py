"""The block-secret key file is never replaced: only a missing file is "no key", an unusable one
stops the service with one line, and a new key is refused while the database holds secrets."""

from __future__ import annotations

import ctypes
import os
import subprocess
from pathlib import Path

import pytest
from cryptography.fernet import Fernet

from deployments.service.encryption_key import (
    KEY_ENV,
    KEY_FILE,
    EncryptionKeyError,
    ensure_encryption_key,
)
from tests.peers.net import free_port
from tests.service import CLI
from tests.system.test_service_hardening import drain_events

#: ``prctl(PR_CAPBSET_DROP)`` and the capabilities that let root read a file whatever its mode.
PR_CAPBSET_DROP = 24
CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH = 1, 2


def _as_a_plain_user() -> None:
    """In the child: file modes apply to it, as to the service user (root without the
    capabilities that ignore them; a non-root user needs nothing)."""
    libc = ctypes.CDLL(None, use_errno=True)
    for cap in (CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH):
        libc.prctl(PR_CAPBSET_DROP, cap, 0, 0, 0)


def service_env(home: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_API")}
    env.pop(KEY_ENV, None)
    env.update({"DICOM_DISPATCH_HOME": str(home), "PREFECT_HOME": str(home / "prefect")})
    return env


def key_file(home: Path) -> tuple[Path, bytes]:
    home.mkdir(mode=0o700)
    path = home / KEY_FILE
    data = Fernet.generate_key() + b"\n"
    path.write_bytes(data)
    return path, data


def test_unreadable_key_file_stops_serve_and_is_left_alone(tmp_path: Path) -> None:
    """The key file mode 000 (as after a command run once with sudo): ``serve`` refuses to
    start with one line naming the file and the fix; the file is byte-identical."""
    home = tmp_path / "home"
    path, data = key_file(home)
    path.chmod(0)
    args = ["serve", "--db", "sqlite", "--port", str(free_port()), "--workers", "1"]
    try:
        done = subprocess.run(
            [*CLI, *args],
            env=service_env(home),
            capture_output=True,
            text=True,
            timeout=120,
            preexec_fn=_as_a_plain_user,  # noqa: PLW1509 - no threads that matter in the child
        )
    except subprocess.TimeoutExpired:
        pytest.fail("serve started with a key file it cannot read")
    finally:
        path.chmod(0o600)
    assert path.read_bytes() == data, "the key file must never be replaced"
    assert done.returncode != 0
    assert "Traceback" not in done.stderr, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert str(path) in lines[0], lines[0]
    assert "chmod 600" in lines[0], lines[0]


@pytest.mark.parametrize("kind", ["link", "directory", "damaged"])
def test_key_file_that_is_not_a_key_stops_commands(tmp_path: Path, kind: str) -> None:
    """A link (even to a good key), a directory or a damaged file: a command refuses with
    one line, and the entry stays exactly as it was."""
    home = tmp_path / "home"
    path, data = key_file(home)
    if kind == "link":
        elsewhere = tmp_path / "elsewhere"
        path.rename(elsewhere)
        path.symlink_to(elsewhere)
    elif kind == "directory":
        path.unlink()
        path.mkdir()
    else:
        data = b"\x00" * 44
        path.write_bytes(data)
    args = ["serve", "--db", "sqlite", "--port", str(free_port()), "--workers", "1"]
    done = subprocess.run(
        [*CLI, *args], env=service_env(home), capture_output=True, text=True, timeout=120
    )
    assert done.returncode != 0
    assert done.stderr.count("\n") == 1, done.stderr
    assert str(path) in done.stderr
    if kind == "link":
        assert path.is_symlink()
        assert (tmp_path / "elsewhere").read_bytes() == data
    elif kind == "directory":
        assert path.is_dir()
        assert not any(path.iterdir())
    else:
        assert path.read_bytes() == data


def test_new_key_refused_while_the_database_holds_secrets(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The key file is gone, the database holds a secret written with it (and no key): no new
    key is made, which would leave every stored secret unreadable for good."""
    from prefect.blocks.system import Secret
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from tests.peers.prefect_server import running_prefect_server

    base, home = tmp_path / "db", tmp_path / "home"
    home.mkdir()
    lost = Fernet.generate_key().decode()
    with running_prefect_server(base, db="sqlite", env={KEY_ENV: lost}) as server:
        with temporary_settings(updates={PREFECT_API_URL: server.api_url}):
            Secret(value="s3cr3t").save("needs-the-lost-key", overwrite=True)
            drain_events()
    monkeypatch.delenv(KEY_ENV, raising=False)
    monkeypatch.setenv(
        "PREFECT_API_DATABASE_CONNECTION_URL", f"sqlite+aiosqlite:///{base / 'prefect.db'}"
    )
    with pytest.raises(EncryptionKeyError, match="restore it from a backup"):
        ensure_encryption_key(home)
    assert not (home / KEY_FILE).exists(), "no new key while secrets need the old one"
    assert KEY_ENV not in os.environ
