"""The Prefect server serve starts keeps run history for a period: older finished runs go.

The session's server is started by ``deployments.service.server.PrefectServer`` (serve's own code
path), with the vacuum looking every few seconds (tests/conftest.py). Runs' end times are
backdated in the server's PostgreSQL, as if they had finished long ago.
"""

from __future__ import annotations

import asyncio
import os
import time
from uuid import UUID

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact
from prefect.client.orchestration import get_client
from prefect.states import Running

from blocks.host import DEFAULT_HISTORY_RETENTION
from tests.peers.prefect_server import server_has


@flow(name="history_probe", persist_result=False)
def history_probe(label: str) -> str:
    get_run_logger().warning("probe %s", label)
    create_markdown_artifact(markdown=f"probe {label}", key=f"probe-{label}")
    return label


async def _backdate(run_ids: list[UUID], days: float) -> None:
    import asyncpg

    url = os.environ["PREFECT_API_DATABASE_CONNECTION_URL"].replace(
        "postgresql+asyncpg://", "postgresql://", 1
    )
    conn = await asyncpg.connect(url)
    try:
        await conn.execute(
            "UPDATE flow_run SET start_time = now() - $2 * interval '1 day', "
            "end_time = now() - $2 * interval '1 day' + interval '1 second' "
            "WHERE id = ANY($1::uuid[])",
            run_ids,
            days,
        )
    finally:
        await conn.close()


def _exists(run_id: UUID) -> bool:
    return server_has(lambda client: client.read_flow_run(run_id))


async def _children(run_id: UUID) -> tuple[int, int]:
    """(logs, artifacts) of a run, read through the REST API."""
    counts = []
    async with get_client() as client:
        for kind in ("logs", "artifacts"):
            body = {kind: {"flow_run_id": {"any_": [str(run_id)]}}, "limit": 100}
            response = await client._client.post(f"/{kind}/filter", json=body)
            counts.append(len(response.json()))
    return counts[0], counts[1]


def test_runs_older_than_the_retention_are_vacuumed(prefect_server: str) -> None:
    from prefect.logging.handlers import APILogWorker

    old = history_probe("old", return_state=True).state_details.flow_run_id
    young = history_probe("young", return_state=True).state_details.flow_run_id
    assert old is not None
    assert young is not None
    APILogWorker.drain_all(timeout=10)

    async def unfinished() -> UUID:
        async with get_client() as client:
            run = await client.create_flow_run(history_probe, parameters={"label": "running"})
            await client.set_flow_run_state(run.id, Running(), force=True)
            return run.id

    running = asyncio.run(unfinished())
    logs, artifacts = asyncio.run(_children(old))
    assert logs >= 1
    assert artifacts == 1
    days = DEFAULT_HISTORY_RETENTION / 86400 + 10
    asyncio.run(_backdate([old, running], days))

    deadline = time.monotonic() + 60
    while _exists(old):
        assert time.monotonic() < deadline, "the vacuum did not remove the old run in 60 s"
        time.sleep(1)
    assert asyncio.run(_children(old)) == (0, 0)
    # A run that finished within the period, and one still running, stay.
    assert _exists(young)
    assert _exists(running)
