"""The Redis between the processes of ``serve --api-processes N``: Debian's ``redis-server``.

Prefect's multi-process server keeps in Redis what one process keeps in memory: the event
stream between the API processes and the services, its de-duplication cache, the causal
ordering of events, the leases of concurrency slots and the docket of background tasks (so
that the scheduler's runs are made once, whichever process takes them).

The leases are the service's limits: a lease lost is a slot that never comes back. So Redis
writes an append-only file in ``<data dir>/redis`` (``appendonly yes``, flushed every second)
and a restarted Redis has every lease that was held before. It listens on loopback only and
requires a password, generated once and kept 0600 beside its data; the password reaches Redis
through its configuration file (0600) and Prefect through the environment of the server's
processes, never a command line or a log.
"""

from __future__ import annotations

import secrets
import shutil
import socket
from pathlib import Path
from urllib.parse import quote

from blocks.host import write_private_file
from deployments.service.child_process import ChildProcess

__all__ = ["REDIS_HOST", "EmbeddedRedis", "redis_binary"]

REDIS_HOST = "127.0.0.1"
#: Prefect's messaging, ordering and leases in one database, the docket in another.
MESSAGING_DB = 0
DOCKET_DB = 1
PASSWORD_FILE = "password"  # noqa: S105 - the name of the file that holds it
CONFIG_FILE = "redis.conf"


def redis_binary() -> str:
    """Debian's ``redis-server`` (package ``redis-server``)."""
    found = shutil.which("redis-server") or shutil.which("redis-server", path="/usr/bin:/usr/sbin")
    if found is None:
        raise RuntimeError("--api-processes needs Redis: install the Debian package redis-server")
    return found


class EmbeddedRedis(ChildProcess):
    """``redis-server`` with its data in ``folder``, on a free loopback port chosen at its
    first start and kept for its restarts (the server's processes were told that one)."""

    name = "Redis"
    key = "redis"
    others_depend = True

    def __init__(self, folder: Path, log_file: Path) -> None:
        super().__init__(log_file)
        self.folder = folder
        self.port = 0
        self._password: str | None = None

    @property
    def password(self) -> str:
        """Generated once, kept in ``<folder>/password`` (0600)."""
        if self._password is None:
            path = self.folder / PASSWORD_FILE
            try:
                stored = path.read_text().strip()
            except FileNotFoundError:
                stored = ""
            if not stored:
                stored = secrets.token_urlsafe(32)
                write_private_file(path, stored + "\n")
            self._password = stored
        return self._password

    def command(self) -> list[str]:
        return [redis_binary(), str(self.folder / CONFIG_FILE)]

    def launch(self) -> None:
        self.folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        if not self.port:
            self.port = _free_loopback_port()
        write_private_file(self.folder / CONFIG_FILE, self._config())
        super().launch()

    def _config(self) -> str:
        return "\n".join(
            [
                f"bind {REDIS_HOST}",
                f"port {self.port}",
                "protected-mode yes",
                f"requirepass {self.password}",
                f"dir {self.folder}",
                "appendonly yes",
                "appendfsync everysec",
                'save ""',  # the append-only file alone: no snapshot to wait for at a stop
                "daemonize no",
                'logfile ""',  # to the log file serve gives it
                "",
            ]
        )

    def ready(self) -> bool:
        """Whether it answers ``PING`` after ``AUTH`` (loading its file, it answers an error)."""
        request = _resp("AUTH", self.password) + _resp("PING")
        try:
            with socket.create_connection((REDIS_HOST, self.port), timeout=1.0) as conn:
                conn.sendall(request)
                answer = b""
                while answer.count(b"\r\n") < 2:
                    chunk = conn.recv(256)
                    if not chunk:
                        break
                    answer += chunk
        except OSError:
            return False
        return answer == b"+OK\r\n+PONG\r\n"

    def prefect_settings(self) -> dict[str, str]:
        """The variables that put every process of Prefect's server on this Redis: Prefect's
        documented settings for a multi-process server with ``prefect-redis``."""
        password = self.password
        return {
            "PREFECT_MESSAGING_BROKER": "prefect_redis.messaging",
            "PREFECT_MESSAGING_CACHE": "prefect_redis.messaging",
            "PREFECT_SERVER_EVENTS_CAUSAL_ORDERING": "prefect_redis.ordering",
            "PREFECT_SERVER_CONCURRENCY_LEASE_STORAGE": "prefect_redis.lease_storage",
            "PREFECT_REDIS_MESSAGING_HOST": REDIS_HOST,
            "PREFECT_REDIS_MESSAGING_PORT": str(self.port),
            "PREFECT_REDIS_MESSAGING_DB": str(MESSAGING_DB),
            "PREFECT_REDIS_MESSAGING_PASSWORD": password,
            "PREFECT_SERVER_DOCKET_URL": (
                f"redis://:{quote(password, safe='')}@{REDIS_HOST}:{self.port}/{DOCKET_DB}"
            ),
        }


def _resp(*words: str) -> bytes:
    """One command in Redis's protocol."""
    parts = [f"*{len(words)}\r\n".encode()]
    for word in words:
        data = word.encode()
        parts.append(b"$%d\r\n%s\r\n" % (len(data), data))
    return b"".join(parts)


def _free_loopback_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind((REDIS_HOST, 0))
        return int(probe.getsockname()[1])
