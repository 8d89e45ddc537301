"""The Prefect server ``serve`` starts when no ``PREFECT_API_URL`` is set, as processes in order.

One ``prefect server start`` by default. With ``api_processes`` of 2 or more, Prefect's
multi-process server: Redis first (``redis.py``), the database made ready once, then the API
processes and the services process (``server.py``), every one of them told where Redis is.
Started in the order they depend on each other, stopped in reverse, and handed to the
supervisor as its parts, behind the embedded PostgreSQL when there is one.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from deployments.service.child_process import ChildProcess, stop_all
from deployments.service.redis import EmbeddedRedis
from deployments.service.server import (
    SETUP_DONE_ENV,
    PrefectServer,
    PrefectServices,
    prepare_database,
)
from deployments.service.supervisor import EmbeddedPostgres, Supervised

__all__ = ["REDIS_STOP_SECONDS", "ServerStack"]

#: Redis writes its append-only file and exits in milliseconds; more is a hang.
REDIS_STOP_SECONDS = 1.0


class ServerStack:
    """The server's processes; ``pgdata`` is the embedded PostgreSQL they use, if any."""

    def __init__(
        self,
        home: Path,
        host: str,
        port: int,
        env: Mapping[str, str],
        pgdata: Path | None,
        api_processes: int = 1,
    ) -> None:
        logs = home / "logs"
        self.logs = logs
        self.pgdata = pgdata
        self.api = PrefectServer(host, port, logs / "prefect-server.log", env, api_processes)
        self.redis: EmbeddedRedis | None = None
        self.services: PrefectServices | None = None
        if api_processes > 1:
            self.redis = EmbeddedRedis(home / "redis", logs / "redis.log")
            self.services = PrefectServices(logs / "prefect-services.log", env)

    @property
    def prefect_processes(self) -> list[ChildProcess]:
        return [p for p in (self.api, self.services) if p is not None]

    def parts(self) -> list[Supervised]:
        """What the supervisor watches, dependencies first."""
        found: list[Supervised] = []
        if self.pgdata is not None:
            found.append(EmbeddedPostgres(self.pgdata))
        if self.redis is not None:
            found.append(self.redis)
        return [*found, *self.prefect_processes]

    def start(self) -> None:
        if self.redis is not None:
            self.redis.start()
            prepare_database(self.logs / "prefect-server.log", self.api.env)
            shared = {**self.redis.prefect_settings(), **SETUP_DONE_ENV}
            for process in self.prefect_processes:
                process.env.update(shared)
        for process in self.prefect_processes:
            process.launch()
        for process in self.prefect_processes:
            process.wait_ready()

    def stop(self, timeout: float) -> None:
        """The Prefect processes at once, then Redis (they write to it as they stop)."""
        stop_all(self.prefect_processes, timeout)
        if self.redis is not None:
            self.redis.stop(min(timeout, REDIS_STOP_SECONDS))
