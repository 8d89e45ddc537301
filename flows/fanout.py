"""Work-pool mode: the sweep queues one ``dispatch-case`` run per ready case for the workers.

When ``prefect.yaml`` put ``dispatch-case`` on a work pool and the sweep itself runs as a
deployment run (on a worker), the sweep does not send: it claims each ready case (in urgent /
normal / off-peak order), creates a run of ``dispatch-case`` on the work queue named after the
case's priority, and hands the claim to that run (a *queued* claim, ``tasks/claims.py``). The
worker's run adopts the claim when it starts, so the case is dispatched once; a queued run that
ends without starting (cancelled, crashed) frees its claim through the takeover rule.

At most ``capacity`` cases are claimed at once (queued or running), so a backlog waits in
outgoing/ in order instead of becoming thousands of scheduled runs.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING
from uuid import UUID

from prefect.client.orchestration import PrefectClient, get_client
from prefect.context import FlowRunContext
from prefect.exceptions import ObjectNotFound

from flows.case_states import CASE_DEPLOYMENT
from flows.dispatch import case_run_labels
from tasks import casefolder as cf

if TYPE_CHECKING:
    from flows.sweep import Dispatcher

__all__ = ["case_pool_deployment", "fan_out"]

LOGGER = logging.getLogger(__name__)


async def case_pool_deployment(client: PrefectClient) -> UUID | None:
    """The ``dispatch-case`` deployment's id when this sweep should fan out, else None.

    Only a sweep that runs as a deployment run (on a worker) fans out; ``dicom-dispatch sweep``
    and the service's loop always dispatch in their own process.
    """
    context = FlowRunContext.get()
    if context is None or context.flow_run is None or context.flow_run.deployment_id is None:
        return None
    try:
        deployment = await client.read_deployment_by_name(CASE_DEPLOYMENT)
    except ObjectNotFound:
        return None
    return deployment.id if deployment.work_pool_name else None


async def fan_out(dispatcher: Dispatcher, deployment_id: UUID) -> tuple[int, bool]:
    """Queue a run per ready case that fits; (cases queued, HALT set)."""
    scan, ordered = await dispatcher.ready_cases()
    if scan.halted:
        return 0, True
    outgoing = dispatcher.settings.folders()[0]
    room = max(0, dispatcher.capacity - len(scan.claimed))
    queued = 0
    async with get_client() as client:
        for cand in ordered[:room]:
            if cf.is_halted(outgoing):
                return queued, True
            claim = dispatcher.take(cand.path)
            if claim is None:
                continue
            name, tags = case_run_labels(cand.path, cand.task, cand.priority, dispatcher.settings)
            with claim:  # released if the run cannot be created; else handed over to the run
                run = await client.create_flow_run_from_deployment(
                    deployment_id,
                    parameters={"case": str(cand.path)},
                    name=name,
                    tags=tags,
                    work_queue_name=cand.priority,
                )
                claim.hand_over(str(run.id))
            queued += 1
            LOGGER.info("case %s queued on %s as run %s", cand.path.name, cand.priority, run.id)
    return queued, False
