"""Bootstrap Prefect's tag concurrency limits from ``DispatcherSettings`` and the target blocks.

``dicom-dispatch`` = ``num_proc``, ``target-type:<type>`` = the per-type limit and
``target:<name>`` = the block's ``max_concurrent_sends``. A limit of 0 or unset means *no limit*:
the tag's limit is deleted, never set to 0 (a limit of 0 makes Prefect abort the runs).
"""

from __future__ import annotations

from prefect.client.orchestration import PrefectClient
from prefect.exceptions import ObjectNotFound

from blocks.registry import TARGET_TYPES
from blocks.settings import DispatcherSettings
from tasks.paging import read_all
from tasks.tags import TOTAL_TAG, target_tag, type_tag

__all__ = ["apply_limits", "wanted_limits"]


def wanted_limits(
    settings: DispatcherSettings, target_limits: dict[str, int | None]
) -> dict[str, int]:
    """Every tag we manage and its limit (0 = none)."""
    sends = settings.send_limits()
    wanted = {TOTAL_TAG: sends.total}
    for kind in TARGET_TYPES:
        wanted[type_tag(kind)] = sends.per_type.get(kind, 0)
    for name, limit in target_limits.items():
        wanted[target_tag(name)] = limit or 0
    return wanted


async def apply_limits(client: PrefectClient, wanted: dict[str, int]) -> dict[str, int]:
    """Create, update or delete tag limits so the server matches ``wanted``; returns what is set.

    Only what differs from the server is written: ``serve`` applies the limits at every
    settings refresh, and with the limits unchanged that is one read instead of a write (or a
    404 for a limit that is not there) per managed tag. A limit removed or changed behind the
    service's back is put back at the next refresh all the same.
    """
    current = {
        limit.tag: limit.concurrency_limit
        for limit in await read_all(
            lambda limit, offset: client.read_concurrency_limits(limit=limit, offset=offset)
        )
    }
    applied: dict[str, int] = {}
    for tag, limit in wanted.items():
        if limit and limit > 0:
            if current.get(tag) != limit:
                await client.create_concurrency_limit(tag=tag, concurrency_limit=limit)
            applied[tag] = limit
        elif tag in current:
            try:
                await client.delete_concurrency_limit_by_tag(tag)
            except ObjectNotFound:
                pass  # removed meanwhile: what was wanted
    return applied
