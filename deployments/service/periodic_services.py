"""What keeps a long-running service in order beside the dispatcher loop (one task in serve).

The cleaner (``cleaner_service.py``), the metrics endpoint and its sampler
(``metrics_endpoint.py``), the audit of the send slots (``slot_audit.py``), each a
:class:`~tasks.periodic.Periodic` (the table: architecture §2.4). Each ends when ``stop`` is
set; a failure of one is logged and never stops the dispatcher. The Storage Commitment
listener (``commitment_service.py``) runs beside them.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from blocks.host import metrics_address
from blocks.settings import DispatcherSettings
from deployments.service.cleaner_service import run_cleaner
from deployments.service.commitment_service import run_commitment_listener
from deployments.service.metrics_endpoint import MetricsEndpoint, sample_forever
from deployments.service.slot_audit import run_slot_audit

__all__ = ["run_periodic_services"]


async def run_periodic_services(
    settings: Callable[[], DispatcherSettings], stop: asyncio.Event
) -> None:
    """Until ``stop``: clean success/, serve and sample the metrics (when an address is set),
    give back the send slots no lease holds."""
    endpoint: MetricsEndpoint | None = None
    where = metrics_address()
    if where is not None:
        endpoint = MetricsEndpoint(settings)
        endpoint.start(*where)
    try:
        await asyncio.gather(
            run_cleaner(settings, stop),
            sample_forever(stop),
            run_slot_audit(stop),
            run_commitment_listener(settings, stop),
        )
    finally:
        if endpoint is not None:
            endpoint.stop()
