"""A real ``prefect server start`` on an embedded PostgreSQL, for the integration tests.

The same code path as the service (``deployments.service.server.PrefectServer``), so the tests
exercise what users run: scheduler, repossessor and filesystem lease storage included. With
``auth_string`` the server requires it, as the service's does (clients then need
``PREFECT_API_AUTH_STRING``).
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

from deployments.service.api import LEASE_STORAGE, QUIET_ENV
from deployments.service.database import embedded_postgres_url, stop_embedded_postgres
from deployments.service.server import PrefectServer
from tests.peers.net import free_port

if TYPE_CHECKING:
    from prefect.client.orchestration import PrefectClient

__all__ = ["running_prefect_server", "server_has"]


@contextmanager
def running_prefect_server(
    base: Path,
    db: str = "postgres",
    auth_string: str | None = None,
    env: dict[str, str] | None = None,
) -> Iterator[PrefectServer]:
    """Start a Prefect server (own PREFECT_HOME and database under ``base``); stop it after."""
    base.mkdir(parents=True, exist_ok=True)
    saved = dict(os.environ)
    pgdata = base / "postgres"
    os.environ.update(QUIET_ENV)
    os.environ["PREFECT_SERVER_CONCURRENCY_LEASE_STORAGE"] = LEASE_STORAGE
    os.environ["PREFECT_HOME"] = str(base / "prefect-home")
    if db == "postgres":
        os.environ["PREFECT_API_DATABASE_CONNECTION_URL"] = embedded_postgres_url(pgdata)
    else:
        os.environ["PREFECT_API_DATABASE_CONNECTION_URL"] = (
            f"sqlite+aiosqlite:///{base / 'prefect.db'}"
        )
    child_env = dict(env or {})
    if auth_string is not None:
        child_env["PREFECT_SERVER_API_AUTH_STRING"] = auth_string
    server = PrefectServer("127.0.0.1", free_port(), base / "server.log", child_env)
    try:
        server.start()
        yield server
    finally:
        server.stop()
        os.environ.clear()
        os.environ.update(saved)
        if db == "postgres":
            stop_embedded_postgres(pgdata)


def server_has(read: Callable[[PrefectClient], Awaitable[object]]) -> bool:
    """Whether the Prefect server of this process's settings has what ``read`` reads with a
    client (a flow run, a deployment, ...): ``ObjectNotFound`` means it has not."""
    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectNotFound

    async def check() -> bool:
        async with get_client() as client:
            try:
                await read(client)
            except ObjectNotFound:
                return False
            return True

    return asyncio.run(check())
