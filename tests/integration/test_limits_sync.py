"""The service's tag limits against a real Prefect server: what differs is written, what is
unchanged is left, and a limit changed or removed behind the service's back comes back."""

from __future__ import annotations

import asyncio
from uuid import uuid4

from prefect.client.orchestration import PrefectClient, get_client

from deployments.limits import apply_limits
from tasks.tags import target_tag


async def limits_of(client: PrefectClient, tags: list[str]) -> dict[str, int]:
    found = await client.read_concurrency_limits(limit=200, offset=0)
    return {limit.tag: limit.concurrency_limit for limit in found if limit.tag in tags}


def test_limits_follow_the_wanted_ones(prefect_server: str) -> None:
    kept, changed, removed = (target_tag(f"sync-{uuid4().hex[:8]}") for _ in range(3))
    tags = [kept, changed, removed]

    async def scenario() -> None:
        async with get_client() as client:
            await client.create_concurrency_limit(tag=changed, concurrency_limit=5)
            await client.create_concurrency_limit(tag=removed, concurrency_limit=3)
            wanted = {kept: 2, changed: 4, removed: 0}

            assert await apply_limits(client, wanted) == {kept: 2, changed: 4}
            assert await limits_of(client, tags) == {kept: 2, changed: 4}
            before = await client.read_concurrency_limit_by_tag(kept)

            await apply_limits(client, wanted)  # nothing differs: nothing is written
            after = await client.read_concurrency_limit_by_tag(kept)
            assert (after.id, after.updated) == (before.id, before.updated)

            await client.delete_concurrency_limit_by_tag(kept)  # behind the service's back
            await client.create_concurrency_limit(tag=changed, concurrency_limit=9)
            await apply_limits(client, wanted)
            assert await limits_of(client, tags) == {kept: 2, changed: 4}

            await apply_limits(client, dict.fromkeys(tags, 0))
            assert await limits_of(client, tags) == {}

    asyncio.run(scenario())
