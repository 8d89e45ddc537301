"""Gives back the send slots that Prefect counts but no lease holds, so sends never stall for good.

Prefect takes a tag-limit slot in two steps: it counts the slot in its database, then writes
the slot's lease. A server that dies between the two (killed, out of memory, its host gone)
leaves a slot counted with no lease to expire it; Prefect's repossessor frees only expired
leases, so the tag limit is one slot smaller for ever, and once ``num_proc`` slots are lost no
case is sent again. Nothing in the API reports it; the Prefect UI shows the limit as busy.

Each audit compares, for every send tag (``tasks/tags.py``), the slots the limit counts with
the slots its live task-run leases hold (the count read twice, before and after the leases: a
slot taken or given back meanwhile makes the reading void). An excess seen in two audits in a
row is a leak, and the smaller of the two excesses is given back: a slot of a dead task whose
lease has expired but is not yet revoked is freed by Prefect within its repossessor's loop, so
it cannot be counted twice. An audit holds a server-side lock (a global concurrency limit of 1)
so that the services of several hosts never give back the same slot twice.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from uuid import UUID

from prefect.client.orchestration import PrefectClient, get_client
from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate
from prefect.exceptions import ObjectAlreadyExists, ObjectNotFound, PrefectHTTPStatusError

from tasks.paging import read_all
from tasks.periodic import Periodic
from tasks.tags import is_send_tag

__all__ = ["AUDIT_LOCK", "AUDIT_SECONDS", "SlotAudit", "run_slot_audit"]

LOGGER = logging.getLogger(__name__)
AUDIT_SECONDS = 30.0
AUDIT_LOCK = "dicom-dispatch-slot-audit"
#: The shortest lease the server accepts; an audit takes well under a second.
LOCK_LEASE_SECONDS = 60.0
#: A leaked slot served no one (the server wants a positive occupancy with a decrement).
NO_OCCUPANCY = 1e-3
_TAG_PREFIX = "tag:"


@dataclass(frozen=True)
class Reading:
    """One send tag's limit as one audit saw it."""

    tag: str
    counted: int
    held: int

    @property
    def excess(self) -> int:
        return self.counted - self.held


class SlotAudit:
    """The audits of one service; remembers the previous audit's excesses."""

    def __init__(self, interval: float = AUDIT_SECONDS) -> None:
        self.interval = interval
        self._suspects: dict[str, int] = {}
        self._suspects_at = 0.0

    async def audit(self, client: PrefectClient) -> dict[str, int]:
        """One audit under the lock; the slots given back per tag (none when another host is
        auditing: its audit counts, and this one's memory of excesses is dropped)."""
        async with _audit_lock(client) as held:
            if not held:
                self._suspects = {}
                return {}
            readings = await read_send_limits(client)
            fresh = time.monotonic() - self._suspects_at <= 2.5 * self.interval
            before = self._suspects if fresh else {}
            freed: dict[str, int] = {}
            for reading in readings:
                leak = min(before.get(reading.tag, 0), reading.excess)
                if leak > 0:
                    await client.release_concurrency_slots(
                        names=[_TAG_PREFIX + reading.tag],
                        slots=leak,
                        occupancy_seconds=NO_OCCUPANCY,
                    )
                    freed[reading.tag] = leak
            self._suspects = {
                r.tag: r.excess for r in readings if r.excess > 0 and r.tag not in freed
            }
            self._suspects_at = time.monotonic()
        for tag, slots in freed.items():
            LOGGER.warning(
                "tag limit %s: gave back %d slot(s) counted with no lease (the Prefect server "
                "stopped between counting and leasing them)",
                tag,
                slots,
            )
        return freed


async def read_send_limits(client: PrefectClient) -> list[Reading]:
    """Every send tag's limit with a slot counted, read so that a change meanwhile voids it."""
    readings = []
    for name, counted in (await _counted(client)).items():
        tag = name.removeprefix(_TAG_PREFIX)
        try:
            held = len((await client.read_concurrency_limit_by_tag(tag)).active_slots or [])
            again = (await client.read_global_concurrency_limit_by_name(name)).active_slots
        except ObjectNotFound:
            continue  # deleted meanwhile (a limit set to "none")
        if again == counted:
            readings.append(Reading(tag=tag, counted=counted, held=held))
    return readings


async def _counted(client: PrefectClient) -> dict[str, int]:
    """The counted slots of every send tag's limit that counts any."""
    counted: dict[str, int] = {}
    for limit in await read_all(
        lambda size, offset: client.read_global_concurrency_limits(limit=size, offset=offset)
    ):
        tag = limit.name.removeprefix(_TAG_PREFIX)
        if limit.name.startswith(_TAG_PREFIX) and is_send_tag(tag) and limit.active_slots:
            counted[limit.name] = limit.active_slots
    return counted


@asynccontextmanager
async def _audit_lock(client: PrefectClient) -> AsyncIterator[bool]:
    """One try at the audit lock (created first when the server has none); yields whether it
    is held."""
    for attempt in range(2):
        try:
            response = await client.increment_concurrency_slots_with_lease(
                names=[AUDIT_LOCK], slots=1, mode="concurrency", lease_duration=LOCK_LEASE_SECONDS
            )
        except PrefectHTTPStatusError as exc:
            if exc.response.status_code != 423:
                raise
            break
        body = response.json()
        lease_id = UUID(body["lease_id"])
        if body.get("limits"):
            try:
                yield True
            finally:
                with contextlib.suppress(ObjectNotFound, PrefectHTTPStatusError):
                    await client.release_concurrency_slots_with_lease(lease_id)
            return
        await client.release_concurrency_slots_with_lease(lease_id)
        if attempt == 0:  # the lock does not exist: a missing limit counts nothing
            with contextlib.suppress(ObjectAlreadyExists):
                await client.create_global_concurrency_limit(
                    GlobalConcurrencyLimitCreate(name=AUDIT_LOCK, limit=1)
                )
    yield False


async def run_slot_audit(stop: asyncio.Event, interval: float = AUDIT_SECONDS) -> None:
    """Until ``stop``: an audit every ``interval`` (a failed one, the API down, is logged at
    debug level and the next one comes as usual)."""
    audit = SlotAudit(interval)

    async def step() -> None:
        async with get_client() as client:
            await audit.audit(client)

    await Periodic("slot audit", step, interval, error_level=logging.DEBUG, logger=LOGGER).run(stop)
