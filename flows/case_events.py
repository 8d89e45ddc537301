"""A case's end announced as Prefect events, one per (case, rule): the rules' automations send them.

mercure notifies per rule when a case reached success/ (``COMPLETED``) or was moved to error/
(``ERROR``), never for an attempt that will be retried. The text is rendered here, from the
case's ``task.json`` and the rule as imported (``tasks.notification_payload``), and travels in
the event's payload; the automation of the rule and channel (``deployments.rule_automations``)
only sends it on. The resource labels say which channels have something to send, so an
automation whose channel could not be rendered for this case does not fire.

The render runs in a worker thread (it waits for a render process with a time limit,
``tasks.template_render``), so a slow template never holds up the dispatcher's loop.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any, Protocol

from prefect import get_run_logger
from prefect.events import emit_event

from blocks.settings import DispatcherSettings
from tasks.notification_payload import (
    COMPLETED,
    ERROR,
    CaseNotification,
    RuleNotification,
    announced_rules,
    render_case_notification,
)
from tasks.taskjson import Task, TaskFileError, read_task

__all__ = [
    "CASE_EVENT",
    "CASE_RESOURCE_PREFIX",
    "EMAIL_LABEL",
    "RULE_LABEL",
    "WEBHOOK_LABEL",
    "announce_outcome",
    "case_event",
    "render_notification",
]

#: Event name per mercure event.
CASE_EVENT = {COMPLETED: "dicom-dispatch.case.completed", ERROR: "dicom-dispatch.case.error"}
CASE_RESOURCE_PREFIX = "dicom-dispatch.case."
RULE_LABEL = "dicom-dispatch.rule"
WEBHOOK_LABEL = "dicom-dispatch.webhook"
EMAIL_LABEL = "dicom-dispatch.email"
_EVENT_OF_LOCATION = {"success": COMPLETED, "error": ERROR}


class Outcome(Protocol):
    """What ``dispatch_case`` knows at the end of an attempt (``flows.dispatch.CaseOutcome``)."""

    case_id: str
    location: str
    path: str


def case_event(note: CaseNotification) -> dict[str, Any]:
    """The event's arguments for ``emit_event``: resource labels for matching, text as payload."""
    payload: dict[str, Any] = {"rule": note.rule, "event": note.event, "task_id": note.task_id}
    if note.webhook_body is not None:
        payload["webhook_body"] = note.webhook_body
    if note.email_body is not None:
        payload["email_subject"] = note.email_subject
        payload["email_body"] = note.email_body
    return {
        "event": CASE_EVENT[note.event],
        "resource": {
            "prefect.resource.id": f"{CASE_RESOURCE_PREFIX}{note.task_id}",
            "prefect.resource.name": note.task_id,
            RULE_LABEL: note.rule,
            WEBHOOK_LABEL: "yes" if note.webhook_body is not None else "no",
            EMAIL_LABEL: "yes" if note.email_body is not None else "no",
        },
        "payload": payload,
    }


async def render_notification(
    rule: RuleNotification, event: str, task: Task, phi_notifications: bool
) -> CaseNotification | None:
    """``render_case_notification`` off the event loop (it blocks up to the render limit)."""
    return await asyncio.to_thread(render_case_notification, rule, event, task, phi_notifications)


async def announce_outcome(outcome: Outcome, settings: DispatcherSettings) -> int:
    """Emit the notification events of a case that reached success/ or error/; how many.

    Anything else (a retry later, a skipped case) announces nothing. A rule missing from the
    imported configuration is logged and skipped, as mercure does; nothing here can fail the run.
    """
    event = _EVENT_OF_LOCATION.get(outcome.location)
    if event is None:
        return 0
    logger = get_run_logger()
    try:
        _, task = read_task(Path(outcome.path))
    except TaskFileError as exc:
        logger.warning("case %s: no notification: %s", outcome.case_id, exc)
        return 0
    sent = 0
    for name in announced_rules(task):
        spec = settings.rule_notifications.get(name)
        if spec is None:
            # mercure's error for a rule its configuration lost; without any imported rules
            # (no mercure.json, or one without rules) there is nothing to miss.
            imported = settings.rule_priorities or settings.rule_notifications
            if imported and name not in settings.rule_priorities:
                logger.error("Rule %s does not exist in the imported configuration", name)
            continue
        rule = RuleNotification.from_mercure(name, spec)
        note = await render_notification(rule, event, task, settings.phi_notifications)
        if note is None:
            continue
        for problem in note.problems:
            logger.error("case %s: notification: %s", task.id, problem)
        if note.webhook_body is None and note.email_body is None:
            continue
        emit_event(**case_event(note))
        sent += 1
    return sent
