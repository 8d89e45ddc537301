"""mercure's rule notifications as Prefect blocks and automations (``import-config``).

Per rule with a webhook and/or e-mail, and per event it triggers on (COMPLETED, ERROR), one
automation per channel, named ``dicom-dispatch: rule <name> <EVENT> (webhook|e-mail)``, so
the UI's Automations page lists exactly what mercure would send. Each waits for the case event
of its rule (``flows.case_events``) and sends the text the dispatcher rendered, unchanged:

- webhook: Prefect's Custom Webhook block with the raw body ``{{body}}`` as form data (httpx
  sends a string as it is) and ``Content-Type: application/json``, so mercure's bytes arrive;
- e-mail: our ``SmtpEmailNotification`` (recipients, text type) pointing at the one
  ``SmtpServer`` document ``mercure-smtp``, which import creates once and then leaves to the
  site (mercure keeps the mail relay outside mercure.json); ``email_notification_from`` sets
  its sender.

Prefect's server renders the action templates with Jinja without autoescaping, and a
``{{ x }}`` of a string is the string itself. Re-importing updates everything in place; a rule
that is gone (or announces nothing now) loses its automations and blocks.
"""

from __future__ import annotations

import datetime as dt
import logging
from typing import cast
from uuid import UUID

from prefect.blocks.notifications import CustomWebhookNotificationBlock
from prefect.client.orchestration import PrefectClient, get_client
from prefect.client.schemas.sorting import AutomationSort
from prefect.events.actions import SendNotification
from prefect.events.schemas.automations import (
    Automation,
    AutomationCore,
    EventTrigger,
    Posture,
)
from prefect.events.schemas.events import ResourceSpecification

from blocks.base import target_slug
from blocks.notifications import SMTP_SERVER_NAME, SmtpEmailNotification, SmtpServer
from deployments.automations import ensure_automation
from flows.case_events import (
    CASE_EVENT,
    CASE_RESOURCE_PREFIX,
    EMAIL_LABEL,
    RULE_LABEL,
    WEBHOOK_LABEL,
)
from tasks.notification_payload import COMPLETED, RuleNotification
from tasks.paging import read_all

__all__ = [
    "RULE_AUTOMATION_PREFIX",
    "RULE_BLOCK_PREFIX",
    "automation_name",
    "read_rule_automations",
    "rule_automation",
    "sync_rule_notifications",
]

LOGGER = logging.getLogger(__name__)

RULE_AUTOMATION_PREFIX = "dicom-dispatch: rule "
RULE_BLOCK_PREFIX = "mercure-rule-"
#: channel → (resource label that says it has something to send, action templates).
_CHANNELS: dict[str, tuple[str, str, str]] = {
    "webhook": (WEBHOOK_LABEL, "Rule {{ event.payload.rule }}", "{{ event.payload.webhook_body }}"),
    "e-mail": (EMAIL_LABEL, "{{ event.payload.email_subject }}", "{{ event.payload.email_body }}"),
}
_BLOCK_TYPES = {
    "webhook": CustomWebhookNotificationBlock.get_block_type_slug(),
    "e-mail": SmtpEmailNotification.get_block_type_slug(),
}


def automation_name(rule: str, event: str, channel: str) -> str:
    return f"{RULE_AUTOMATION_PREFIX}{rule} {event} ({channel})"


def block_name(rule: str, channel: str) -> str:
    return f"{RULE_BLOCK_PREFIX}{target_slug(rule)}-{'email' if channel == 'e-mail' else channel}"


def rule_automation(rule: str, event: str, channel: str, block_id: UUID) -> AutomationCore:
    """One case event of one rule → one notification through the rule's block."""
    label, subject, body = _CHANNELS[channel]
    where = "reached success/" if event == COMPLETED else "was moved to error/"
    return AutomationCore(
        name=automation_name(rule, event, channel),
        description=f"mercure rule {rule!r}: {channel} when a case {where} (import-config).",
        enabled=True,
        trigger=EventTrigger(
            expect={CASE_EVENT[event]},
            match=ResourceSpecification(
                {
                    "prefect.resource.id": f"{CASE_RESOURCE_PREFIX}*",
                    RULE_LABEL: rule,
                    label: "yes",
                }
            ),
            for_each={"prefect.resource.id"},
            posture=Posture.Reactive,
            threshold=1,
            within=dt.timedelta(0),
        ),
        actions=[SendNotification(block_document_id=block_id, subject=subject, body=body)],
    )


async def _smtp_server(sender: str | None) -> SmtpServer:
    """The site's SMTP document: created with mercure's defaults once, then only its sender."""
    try:
        server = cast(SmtpServer, await SmtpServer.aload(SMTP_SERVER_NAME))
    except ValueError:
        server = SmtpServer()
    else:
        if sender is None or server.sender == sender:
            return server
    if sender is not None:
        server.sender = sender
    await server.save(SMTP_SERVER_NAME, overwrite=True)
    return cast(SmtpServer, await SmtpServer.aload(SMTP_SERVER_NAME))


async def _save_blocks(
    rule: RuleNotification, smtp: SmtpServer | None
) -> dict[str, tuple[str, UUID]]:
    """channel → (block document name, id) of the rule's notification blocks."""
    saved: dict[str, tuple[str, UUID]] = {}
    if rule.webhook:
        hook = CustomWebhookNotificationBlock(
            name=f"mercure rule {rule.rule}",
            url=rule.webhook,
            method="POST",
            form_data="{{body}}",
            headers={"Content-Type": "application/json"},
        )
        name = block_name(rule.rule, "webhook")
        saved["webhook"] = (name, await hook.save(name, overwrite=True))
    if rule.email and smtp is not None:
        mail = SmtpEmailNotification(smtp=smtp, to=rule.addresses, email_type=rule.email_type)
        name = block_name(rule.rule, "e-mail")
        saved["e-mail"] = (name, await mail.save(name, overwrite=True))
    return saved


async def read_rule_automations(client: PrefectClient) -> list[Automation]:
    """Every automation an import made (by name), one page at a time."""
    found = await read_all(
        lambda size, offset: client.read_automations(
            sort=AutomationSort.NAME_ASC, limit=size, offset=offset
        )
    )
    return [a for a in found if a.name.startswith(RULE_AUTOMATION_PREFIX)]


async def sync_rule_notifications(
    rules: list[RuleNotification], sender: str | None = None
) -> dict[str, list[str]]:
    """Make the server's rule blocks and automations match ``rules``; rule → automation names."""
    smtp = await _smtp_server(sender)
    wanted: dict[str, AutomationCore] = {}
    kept_blocks: set[str] = set()
    made: dict[str, list[str]] = {}
    for rule in rules:
        blocks = await _save_blocks(rule, smtp)
        kept_blocks.update(name for name, _ in blocks.values())
        for event in rule.events():
            for channel, (_, block_id) in blocks.items():
                automation = rule_automation(rule.rule, event, channel, block_id)
                wanted[automation.name] = automation
                made.setdefault(rule.rule, []).append(automation.name)
    async with get_client() as c:
        for automation in wanted.values():
            await ensure_automation(c, automation)
        for current in await read_rule_automations(c):
            if current.name not in wanted:
                await c.delete_automation(current.id)
                LOGGER.info("deleted the automation %r", current.name)
        for slug in _BLOCK_TYPES.values():
            for doc in await c.read_block_documents_by_type(slug, include_secrets=False):
                name = doc.name or ""
                if name.startswith(RULE_BLOCK_PREFIX) and name not in kept_blocks:
                    await c.delete_block_document(doc.id)
    return made
