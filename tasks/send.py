"""``send_to_target``: one task run per (case, target), visible, tagged and retried in Prefect.

The task takes the target's *name* and loads its block itself, so no credential reaches the run's
parameters. Quick retries (seconds) cover transient network errors only; the folder protocol's
retries (``retry_delay``, ``retry_max``) cover everything else across attempts.
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Any

import anyio
from prefect.logging import get_run_logger

from blocks.base import SendContext
from blocks.prefect_internals import defer_first_lease_renewal
from blocks.registry import aload_target
from tasks.claims import ensure_claim_held
from tasks.retry import peer_task
from tasks.tags import TOTAL_TAG, send_tags, target_tag, type_tag
from tasks.taskjson import read_task

__all__ = ["TOTAL_TAG", "send_tags", "send_to_target", "target_tag", "type_tag"]

# Every send holds tag-limit slots under a lease; Prefect renews it at once, then every 45 s:
# the first renewal comes when it is due instead (blocks/prefect_internals.py).
defer_first_lease_renewal()


@peer_task("send_to_target")
async def send_to_target(
    case_dir: str, target_name: str, report_name: str | None, links_inside: bool = False
) -> dict[str, Any]:
    """Send one case folder to one target; raises a ``TargetError`` when it did not arrive.

    ``links_inside`` is the site's ``case_links_inside`` (links that stay inside the case are
    sent as their files)."""
    logger = get_run_logger()
    folder = Path(case_dir)
    target = await aload_target(target_name)
    _, case_task = read_task(folder)
    report = folder / report_name if report_name else None
    context = SendContext(folder, case_task, report, links_inside=links_inside)
    # Before every send (quick retries included): a claim taken over meanwhile stops it here.
    ensure_claim_held(folder)
    result = await anyio.to_thread.run_sync(target.send, context)
    logger.info(
        "sent %d file(s), %d bytes to %s: %s",
        result.files,
        result.bytes,
        target_name,
        result.detail,
    )
    return asdict(result)
