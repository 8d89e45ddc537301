"""A real OpenSSH ``sshd`` on 127.0.0.1 for the SFTP and rsync targets.

Each server has its own directory: config, ed25519 host key, pid file, ``authorized_keys`` with a
freshly generated client key, a ``known_hosts`` file that knows the host key, and the logs. It
runs as the current user (root in the CI container: ``PermitRootLogin``), without PAM. The SFTP
subsystem is the ``sftp-server`` binary logging every open to ``sftp.log`` (``internal-sftp``
logs only to syslog), so a test can count what was (re-)sent.

Password logins: sshd checks passwords against ``/etc/shadow``. Rather than give a real account
a password, ``password=...`` starts sshd in a private mount namespace (``unshare --mount``) where a
throw-away shadow file with the test password is bind-mounted over ``/etc/shadow``; nothing on the
machine changes. That needs root and ``unshare``; otherwise the password tests are skipped.

Missing OpenSSH skips locally but fails on CI (``CI`` set).
"""

from __future__ import annotations

import getpass
import os
import re
import shlex
import shutil
import signal
import subprocess
from pathlib import Path

import pytest

from tests.peers.base import Peer, require_program
from tests.peers.net import free_port, wait_for_port

__all__ = ["SshServer", "password_logins_possible"]

SSHD = "/usr/sbin/sshd"
SFTP_SERVER = "/usr/lib/openssh/sftp-server"
_OPEN_FOR_WRITE = re.compile(r'^open "(?P<path>.*)" flags \S*WRITE')


def password_logins_possible() -> bool:
    """Whether :class:`SshServer` can accept a password (root and ``unshare`` are needed)."""
    return os.geteuid() == 0 and shutil.which("unshare") is not None


def _keygen(path: Path, comment: str) -> str:
    subprocess.run(
        ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", comment, "-f", str(path)],
        check=True,
        timeout=30,
    )
    return path.with_suffix(".pub").read_text().strip()


class SshServer(Peer):
    """``sshd`` on a free 127.0.0.1 port, started and always stopped by ``with``.

    The remote side is this machine, so tests look at what arrived directly on disk.
    """

    def __init__(self, root: Path, *, password: str | None = None) -> None:
        self.root = root
        self.password = password
        self.user = getpass.getuser()
        self.host = "127.0.0.1"
        self.port = 0
        self.key_file = root / "client_key"
        self.known_hosts = root / "known_hosts"
        self.sftp_log = root / "sftp.log"
        self.log = root / "sshd.log"
        self.host_key_line = ""
        self._proc: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> SshServer:
        sshd = require_program(SSHD, "openssh-server")
        require_program(SFTP_SERVER, "openssh-server")
        if self.password is not None and not password_logins_possible():
            pytest.skip("password logins need root and unshare (a private shadow file for sshd)")
        self.root.mkdir(parents=True, exist_ok=True)
        if os.geteuid() == 0:
            Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)  # privilege separation dir
        host_key = self.root / "ssh_host_ed25519_key"
        host_pub = _keygen(host_key, "dicom-dispatch-test-host")
        client_pub = _keygen(self.key_file, "dicom-dispatch-test-client")
        (self.root / "authorized_keys").write_text(client_pub + "\n")
        self.port = free_port()
        key_type, key_data = host_pub.split()[:2]
        self.host_key_line = f"[{self.host}]:{self.port} {key_type} {key_data}"
        self.known_hosts.write_text(self.host_key_line + "\n")
        config = self.root / "sshd_config"
        config.write_text(self._config(host_key))
        args = [sshd, "-D", "-f", str(config), "-E", str(self.log)]
        if self.password is not None:
            args = self._in_private_namespace(args)
        self._proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, start_new_session=True)
        wait_for_port(self.port, timeout=15, proc=self._proc)
        return self

    def _config(self, host_key: Path) -> str:
        root_login = "yes" if self.password is not None else "prohibit-password"
        subsystem = f"{SFTP_SERVER} -e -l INFO 2>>{shlex.quote(str(self.sftp_log))}"
        return "\n".join(
            [
                f"Port {self.port}",
                f"ListenAddress {self.host}",
                f'HostKey "{host_key}"',
                f'PidFile "{self.root / "sshd.pid"}"',
                f'AuthorizedKeysFile "{self.root / "authorized_keys"}"',
                f"AllowUsers {self.user}",
                f"PermitRootLogin {root_login}",
                f"PasswordAuthentication {'yes' if self.password is not None else 'no'}",
                "KbdInteractiveAuthentication no",
                "PubkeyAuthentication yes",
                "UsePAM no",
                "StrictModes no",
                "UseDNS no",
                "PrintMotd no",
                "MaxStartups 50",
                "LogLevel VERBOSE",
                f"Subsystem sftp {subsystem}",
                "",
            ]
        )

    def _in_private_namespace(self, args: list[str]) -> list[str]:
        """Run sshd where ``/etc/shadow`` is a throw-away file holding the test password."""
        assert self.password is not None
        hashed = subprocess.run(
            ["openssl", "passwd", "-6", "-stdin"],
            input=self.password,
            capture_output=True,
            text=True,
            check=True,
            timeout=30,
        ).stdout.strip()
        shadow = self.root / "shadow"
        shadow.write_text(f"{self.user}:{hashed}:20000:0:99999:7:::\n")
        shadow.chmod(0o600)
        script = f"mount --bind {shlex.quote(str(shadow))} /etc/shadow && exec {shlex.join(args)}"
        return ["unshare", "--mount", "--propagation", "private", "--", "sh", "-c", script]

    def stop(self) -> None:
        """Stop the listener and every session it started (they share its process group)."""
        proc, self._proc = self._proc, None
        if proc is None:
            return
        try:
            os.killpg(proc.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)

    # What a test asserts on.

    def target_fields(self, **changes: object) -> dict[str, object]:
        """The fields an SFTP/rsync target needs to reach this server with the client key."""
        fields: dict[str, object] = {
            "host": self.host,
            "port": self.port,
            "user": self.user,
            "key_file": str(self.key_file),
            "known_hosts_file": str(self.known_hosts),
        }
        fields.update(changes)
        return fields

    def written(self, under: Path | str) -> list[str]:
        """Paths below ``under`` that sftp-server opened for writing, in order (from its log)."""
        if not self.sftp_log.exists():
            return []
        prefix = str(under)
        opened = []
        for line in self.sftp_log.read_text(errors="replace").splitlines():
            # sftp-server -l INFO: open "<path>" flags WRITE,CREATE,TRUNCATE mode 0666
            match = _OPEN_FOR_WRITE.match(line)
            if match and match["path"].startswith(prefix):
                opened.append(match["path"])
        return opened
