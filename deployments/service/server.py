"""The local Prefect server that ``serve`` starts when no ``PREFECT_API_URL`` is set.

A child process (``prefect server start``) on the embedded PostgreSQL, with filesystem lease
storage (memory leases leak concurrency slots on restart) and the UI told its real API address
(the UI does not follow ``--port`` by itself). ``env`` adds the child's own variables (its auth
string, CORS origin, encryption key) without putting them in this process's environment.

With ``processes`` > 1 (``serve --api-processes N``) the same command runs Prefect's
multi-process server: ``--workers N`` gives N API processes behind the one port (uvicorn's
parent restarts a worker that dies), webserver only, and :class:`PrefectServices` runs the
scheduler, the event consumers, the repossessor and the rest in a process of their own. They
need Redis between them (``deployments/service/redis.py``) and a database migrated once before
they start (:func:`prepare_database`): N processes migrating or registering Prefect's block
types at once collide on the same rows, and uvicorn's parent then stops them all.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path

from deployments.service.api import _healthy
from deployments.service.child_process import READY_TIMEOUT, ChildProcess
from deployments.service.history_vacuum import vacuum_environment
from deployments.service.server_tuning import tuning_environment

__all__ = [
    "SETUP_DONE_ENV",
    "PrefectServer",
    "PrefectServices",
    "prepare_database",
]

#: Health checks that may fail in a row before a running server counts as hung.
UNHEALTHY_CHECKS = 10
#: For processes that start on a database :func:`prepare_database` has set up.
SETUP_DONE_ENV = {
    "PREFECT_SERVER_DATABASE_MIGRATE_ON_START": "false",
    "PREFECT_SERVER_REGISTER_BLOCKS_ON_START": "false",
}
PREFECT = [sys.executable, "-m", "prefect"]


class _PrefectProcess(ChildProcess):
    """A process of Prefect's server: ours is the only API it may know of (a restart must not
    make it a client of itself), and it keeps the run history the host asks for."""

    #: Server processes that share the database's connections with this one's pool.
    processes = 1

    def environment(self) -> dict[str, str]:
        env = super().environment()
        env.pop("PREFECT_API_URL", None)
        # run history retention (deployments/service/history_vacuum.py)
        env.update(vacuum_environment(env))
        # measured settings (deployments/service/server_tuning.py)
        env.update(tuning_environment(env, self.processes))
        return env


class PrefectServer(_PrefectProcess):
    """``prefect server start`` as a child process, stopped with the service."""

    name = "the Prefect server"
    key = "api"

    def __init__(
        self,
        host: str,
        port: int,
        log_file: Path,
        env: Mapping[str, str] | None = None,
        processes: int = 1,
    ) -> None:
        super().__init__(log_file, env)
        self.host = host
        self.port = port
        self.processes = processes
        self._unhealthy = 0

    @property
    def api_url(self) -> str:
        return f"http://{self.host}:{self.port}/api"

    @property
    def ui_url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def command(self) -> list[str]:
        argv = [*PREFECT, "server", "start", "--host", self.host, "--port", str(self.port)]
        if self.processes > 1:
            argv += ["--workers", str(self.processes), "--no-services"]
        return argv

    def environment(self) -> dict[str, str]:
        env = super().environment()
        env["PREFECT_UI_API_URL"] = self.api_url
        env["PREFECT_SERVER_API_HOST"] = self.host
        env["PREFECT_SERVER_API_PORT"] = str(self.port)
        return env

    def launch(self) -> None:
        self._unhealthy = 0
        super().launch()

    def ready(self) -> bool:
        return _healthy(self.api_url)

    def why_down(self) -> str | None:
        exited = super().why_down()
        if exited is not None:
            return exited
        self._unhealthy = 0 if self.ready() else self._unhealthy + 1
        if self._unhealthy >= UNHEALTHY_CHECKS:
            return f"{self.name} did not answer {self._unhealthy} health checks"
        return None


class PrefectServices(_PrefectProcess):
    """``prefect server services start``: the loop services the API processes leave out."""

    name = "the Prefect services"
    key = "services"

    def command(self) -> list[str]:
        return [*PREFECT, "server", "services", "start"]


def prepare_database(
    log_file: Path, env: Mapping[str, str], timeout: float = READY_TIMEOUT
) -> None:
    """Migrate the database and register Prefect's block types, once, in a process with the
    servers' environment ``env`` (their database, their ``PREFECT_HOME``)."""
    setup = _PrefectProcess(log_file, env)
    argv = [sys.executable, "-m", "deployments.service.server_database"]
    with open(log_file, "ab") as log:
        done = subprocess.run(
            argv,
            env=setup.environment(),
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            timeout=timeout,
            check=False,
        )
    if done.returncode != 0:
        raise RuntimeError(
            f"setting up the Prefect database failed (code {done.returncode}); see {log_file}"
        )
