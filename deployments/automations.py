"""Prefect automations the service keeps on its server: ghost runs are marked Crashed.

A process that dies (SIGKILL, power loss, a host gone) cannot report its runs' end, so they
would show Running forever. Every flow run sends a heartbeat event every
``HEARTBEAT_SECONDS`` (``PREFECT_FLOWS_HEARTBEAT_FREQUENCY``, set by ``deployments.service.api``
before Prefect is imported, also for runs executed in-process by the dispatcher loop); this
proactive trigger sets a run Crashed when, after a heartbeat, no heartbeat and no state change
came within ``ZOMBIE_WINDOW_SECONDS``. Prefect's own recipe (docs: "detect zombie flows"), with
every state event counting as a sign of life, so our named states (RetryPending, Skipped, ...)
and pauses end the watch too.

Worst case from a run's last sign of life to Crashed: the window plus the trigger service's
evaluation period (a few seconds).
"""

from __future__ import annotations

import datetime as dt
import logging

from prefect.client.orchestration import PrefectClient
from prefect.client.schemas.objects import StateType
from prefect.events.actions import ChangeFlowRunState
from prefect.events.schemas.automations import AutomationCore, EventTrigger, Posture
from prefect.events.schemas.events import ResourceSpecification

from deployments.service.api import HEARTBEAT_SECONDS

__all__ = [
    "HEARTBEAT_SECONDS",
    "ZOMBIE_AUTOMATION",
    "ZOMBIE_WINDOW_SECONDS",
    "ensure_automation",
    "ensure_zombie_automation",
    "zombie_automation",
]

LOGGER = logging.getLogger(__name__)

#: Three missed heartbeats: a loaded host or a slow API is not mistaken for a dead one.
ZOMBIE_WINDOW_SECONDS = 90
ZOMBIE_AUTOMATION = "dicom-dispatch: crash zombie flow runs"


def zombie_message(window: int) -> str:
    return f"no heartbeat for {window} s: the process running this flow run is gone"


def zombie_automation(window: int = ZOMBIE_WINDOW_SECONDS) -> AutomationCore:
    """The automation as it should be on the server (``window``: the settings' takeover window)."""
    return AutomationCore(
        name=ZOMBIE_AUTOMATION,
        description="Marks flow runs Crashed when their process stops sending heartbeats.",
        enabled=True,
        trigger=EventTrigger(
            after={"prefect.flow-run.heartbeat"},
            expect={"prefect.flow-run.*"},
            match=ResourceSpecification({"prefect.resource.id": ["prefect.flow-run.*"]}),
            for_each={"prefect.resource.id"},
            posture=Posture.Proactive,
            threshold=1,
            within=dt.timedelta(seconds=window),
        ),
        actions=[ChangeFlowRunState(state=StateType.CRASHED, message=zombie_message(window))],
    )


async def ensure_zombie_automation(
    client: PrefectClient, window: int = ZOMBIE_WINDOW_SECONDS
) -> str:
    """Create the automation, or bring an existing one of that name up to date (idempotent).

    Returns ``"created"``, ``"updated"`` or ``"unchanged"``.
    """
    return await ensure_automation(client, zombie_automation(window))


async def ensure_automation(client: PrefectClient, wanted: AutomationCore) -> str:
    """Create ``wanted``, or bring the automation of its name up to date; what was done.

    Returns ``"created"``, ``"updated"`` or ``"unchanged"``.
    """
    existing = await client.read_automations_by_name(wanted.name)
    if not existing:
        await client.create_automation(wanted)
        LOGGER.info("created the automation %r", wanted.name)
        return "created"
    current = existing[0]
    fields = {"description", "enabled", "trigger", "actions"}
    if current.model_dump(include=fields) == wanted.model_dump(include=fields):
        return "unchanged"
    await client.update_automation(current.id, wanted)
    LOGGER.info("updated the automation %r", wanted.name)
    return "updated"
