"""Integration fixtures: peers shared by the tests of one module."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.peers.sshd import SshServer


@pytest.fixture(scope="module")
def sshd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SshServer]:
    """A real OpenSSH sshd for the SFTP and rsync targets, one per test module."""
    with SshServer(tmp_path_factory.mktemp("sshd")) as server:
        yield server
