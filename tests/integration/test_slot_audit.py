"""The send slots' audit against a real Prefect server (``deployments/service/slot_audit.py``).

A slot counted with no lease is what a server killed between counting a slot and writing its
lease leaves behind; it is made here with the API's lease-less increment. The audit gives it
back after two audits, never touches a slot a live lease holds, does nothing about an excess
seen once, and does nothing while another host holds the audit lock.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from uuid import UUID, uuid4

from prefect.client.orchestration import PrefectClient, get_client
from prefect.client.schemas.objects import ConcurrencyLeaseHolder

from deployments.limits import apply_limits
from deployments.service.slot_audit import AUDIT_LOCK, SlotAudit
from tasks.tags import target_tag


@asynccontextmanager
async def send_limit(limit: int) -> AsyncIterator[tuple[PrefectClient, str]]:
    """A fresh target tag with a limit, removed afterwards."""
    tag = target_tag(f"audit-{uuid4().hex[:8]}")
    async with get_client() as client:
        await apply_limits(client, {tag: limit})
        try:
            yield client, tag
        finally:
            await apply_limits(client, {tag: 0})


async def counted(client: PrefectClient, tag: str) -> int:
    return (await client.read_global_concurrency_limit_by_name(f"tag:{tag}")).active_slots


async def leased_slot(client: PrefectClient, name: str) -> UUID:
    response = await client.increment_concurrency_slots_with_lease(
        names=[name],
        slots=1,
        mode="concurrency",
        lease_duration=300,
        holder=ConcurrencyLeaseHolder(type="task_run", id=uuid4()),
    )
    return UUID(response.json()["lease_id"])


async def leaked_slot(client: PrefectClient, name: str) -> None:
    await client.increment_concurrency_slots(names=[name], slots=1, mode="concurrency")


def run(test: Callable[[], Awaitable[None]]) -> None:
    asyncio.run(test())  # type: ignore[arg-type]


def test_a_slot_no_lease_holds_is_given_back_after_two_audits(prefect_server: str) -> None:
    async def test() -> None:
        async with send_limit(3) as (client, tag):
            lease = await leased_slot(client, f"tag:{tag}")
            await leaked_slot(client, f"tag:{tag}")
            await leaked_slot(client, f"tag:{tag}")
            audit = SlotAudit()
            assert tag not in await audit.audit(client), "seen once, an excess is no leak yet"
            assert await counted(client, tag) == 3
            assert (await audit.audit(client)).get(tag) == 2
            assert await counted(client, tag) == 1, "the leased slot is still counted"
            assert tag not in await audit.audit(client)
            await client.release_concurrency_slots_with_lease(lease)
            assert await counted(client, tag) == 0

    run(test)


def test_an_excess_gone_by_the_next_audit_is_left_alone(prefect_server: str) -> None:
    async def test() -> None:
        async with send_limit(2) as (client, tag):
            audit = SlotAudit()
            await leaked_slot(client, f"tag:{tag}")
            assert tag not in await audit.audit(client)
            await client.release_concurrency_slots(
                names=[f"tag:{tag}"], slots=1, occupancy_seconds=1
            )
            lease = await leased_slot(client, f"tag:{tag}")
            assert tag not in await audit.audit(client)
            assert await counted(client, tag) == 1
            await client.release_concurrency_slots_with_lease(lease)

    run(test)


def test_no_audit_while_another_host_holds_the_lock(prefect_server: str) -> None:
    async def test() -> None:
        async with send_limit(2) as (client, tag):
            audit = SlotAudit()
            await audit.audit(client)  # creates the lock if this server has none yet
            await leaked_slot(client, f"tag:{tag}")
            assert tag not in await audit.audit(client)
            other_host = UUID(
                (
                    await client.increment_concurrency_slots_with_lease(
                        names=[AUDIT_LOCK], slots=1, mode="concurrency", lease_duration=60
                    )
                ).json()["lease_id"]
            )
            try:
                assert await audit.audit(client) == {}
                assert await counted(client, tag) == 1
            finally:
                await client.release_concurrency_slots_with_lease(other_host)
            # The memory of the excess was dropped while locked out: two audits again.
            assert tag not in await audit.audit(client)
            assert (await audit.audit(client)).get(tag) == 1
            assert await counted(client, tag) == 0

    run(test)
