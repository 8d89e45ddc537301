"""mercure's rule notifications as mercure builds them: webhook body, e-mail subject and text.

A receiver written for mercure (a chat hook, a script) must not see a difference, so this follows
mercure's ``common/notification.py`` step by step: the ``@rule@`` / ``@task_id@`` / ``@event@``
placeholders and a sandboxed Jinja render with mercure's context (``acc``, ``mrn`` and
``patient_name`` are "UNKNOWN" in a webhook unless ``phi_notifications``; ``body`` is
``notification_payload_body`` rendered and JSON-string-escaped), then ``"{" + payload + "}"``
parsed and dumped again exactly as aiohttp's ``json=`` does. Deliberately different: the
placeholders are template variables, never template text (case data is not run as template
code), and a render runs in a worker process with a time, size and memory limit
(``tasks.template_render``); a text that passes one is replaced by a short fallback text. Which
rules and events a case announces is decided here too, so the dispatcher and the importer
agree. No Prefect here.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

from jinja2.utils import htmlsafe_json_dumps

from tasks.taskjson import Task
from tasks.template_render import RenderLimitError, render_bounded

__all__ = [
    "COMPLETED",
    "ERROR",
    "EVENTS",
    "PHI_UNKNOWN",
    "CaseNotification",
    "RuleNotification",
    "announced_rules",
    "custom_details",
    "email_text",
    "fallback_text",
    "notification_requested",
    "render_case_notification",
    "render_text",
    "webhook_body",
]

COMPLETED = "COMPLETED"
ERROR = "ERROR"
EVENTS = (COMPLETED, ERROR)
PHI_UNKNOWN = "UNKNOWN"
#: mercure's subject prefix (``send_email_helper``).
SUBJECT_PREFIX = "[Mercure] "
#: mercure.json rule key → our field.
_RULE_KEYS = {
    "notification_webhook": "webhook",
    "notification_payload": "payload",
    "notification_payload_body": "payload_body",
    "notification_email": "email",
    "notification_email_body": "email_body",
    "notification_email_type": "email_type",
    "notification_trigger_completion": "trigger_completion",
    "notification_trigger_error": "trigger_error",
    "notification_trigger_completion_on_request": "trigger_completion_on_request",
}


@dataclass(frozen=True)
class RuleNotification:
    """The notification part of one mercure rule, with mercure's defaults."""

    rule: str
    webhook: str = ""
    payload: str = ""
    payload_body: str = ""
    email: str = ""
    email_body: str = ""
    email_type: str = "plain"
    trigger_completion: bool = True
    trigger_error: bool = True
    trigger_completion_on_request: bool = False

    @classmethod
    def from_mercure(cls, rule: str, spec: Mapping[str, Any]) -> RuleNotification:
        """From a ``rules.<name>`` object of mercure.json (or what :meth:`as_mercure` stored)."""
        values = {ours: spec[key] for key, ours in _RULE_KEYS.items() if spec.get(key) is not None}
        return cls(rule=rule, **values)

    def as_mercure(self) -> dict[str, Any]:
        """mercure's field names, as kept in the dispatcher settings."""
        values = asdict(self)
        return {key: values[ours] for key, ours in _RULE_KEYS.items()}

    @property
    def addresses(self) -> list[str]:
        """One mail per address; mercure splits on ", " exactly."""
        return self.email.split(", ") if self.email else []

    @property
    def announces(self) -> bool:
        return bool(self.webhook or self.email)

    def events(self) -> list[str]:
        """Events this rule can announce (a processing request can force either)."""
        forced = self.trigger_completion_on_request
        wanted = {COMPLETED: self.trigger_completion or forced, ERROR: self.trigger_error or forced}
        return [event for event in EVENTS if wanted[event]] if self.announces else []

    def sends(self, event: str, requested: bool = False) -> bool:
        """mercure's ``do_send``: the event's trigger, or a processing module's request."""
        if requested and self.trigger_completion_on_request:
            return True
        return self.trigger_completion if event == COMPLETED else self.trigger_error


def render_text(
    text: str,
    event: str,
    rule: str,
    task_id: str,
    details: str,
    context: dict[str, Any],
    device_serial_number: str | None,
) -> str:
    """mercure's ``parse_payload``: a sandboxed Jinja render, the placeholders as variables.

    ``context`` gains ``DeviceSerialNumber`` in place, as in mercure (the webhook's context
    is built from the dict the body was rendered with). ``RenderLimitError`` when the render
    passes a limit; the template's own errors as in mercure.
    """
    context["DeviceSerialNumber"] = device_serial_number
    full = {"rule": rule, "task_id": task_id, "event": event, "details": details, **context}
    placeholders = {"@rule@": rule, "@task_id@": task_id, "@event@": event}
    return render_bounded(text, full, placeholders)


def _phi(task: Task, phi_notifications: bool, webhook: bool) -> dict[str, Any]:
    if not phi_notifications:
        return dict.fromkeys(("acc", "mrn", "patient_name"), PHI_UNKNOWN) if webhook else {}
    # mercure: the webhook turns a missing name into "", the e-mail renders it as "None".
    name = (task.info.patient_name or "") if webhook else task.info.patient_name
    return {"acc": task.info.acc, "mrn": task.info.mrn, "patient_name": name}


def webhook_body(
    rule: RuleNotification, event: str, task: Task, phi_notifications: bool, details: str = ""
) -> str:
    """The exact JSON text mercure POSTs; ``ValueError`` when the payload is not JSON members.

    Jinja errors (a syntax error, a sandbox violation) propagate as they do in mercure.
    """
    serial = task.info.device_serial_number
    phi = _phi(task, phi_notifications, webhook=True)
    body = render_text(rule.payload_body, event, rule.rule, task.id, details, phi, serial)
    context: dict[str, Any] = {"body": htmlsafe_json_dumps(body)[1:-1], **phi}
    payload = render_text(rule.payload, event, rule.rule, task.id, details, context, serial)
    # aiohttp's ``json=`` is ``json.dumps`` with its defaults (ASCII, ", " and ": ").
    return json.dumps(json.loads("{" + payload + "}"))


def email_text(
    rule: RuleNotification, event: str, task: Task, phi_notifications: bool, details: str = ""
) -> tuple[str, str]:
    """(subject, text) of mercure's mail for ``event``; the text is plain or HTML per the rule."""
    context = _phi(task, phi_notifications, webhook=False)
    text = render_text(
        rule.email_body, event, rule.rule, task.id, details, context, task.info.device_serial_number
    )
    return f"{SUBJECT_PREFIX}Rule {rule.rule}: {event}", text


def announced_rules(task: Task) -> list[str]:
    """``info.applied_rule`` if set, else every key of ``info.triggered_rules`` (mercure)."""
    if task.info.applied_rule:
        return [task.info.applied_rule]
    rules = task.info.triggered_rules
    return list(rules) if isinstance(rules, dict) else []


def _process_outputs(process: Any) -> list[tuple[str, dict[str, Any]]]:
    """(module name, output) of each processing step that left an output."""
    steps = process if isinstance(process, list) else [process]
    return [
        (str(step["module_name"]), step["output"])
        for step in steps
        if isinstance(step, dict) and "module_name" in step and isinstance(step.get("output"), dict)
    ]


def notification_requested(process: Any) -> bool:
    """A processing module asked for a notification (``__mercure_notification.requested``)."""
    for _, output in _process_outputs(process):
        info = output.get("__mercure_notification")
        if isinstance(info, dict) and info.get("requested"):
            return True
    return False


def custom_details(process: Any) -> str:
    """The ``details`` text: each module's ``__mercure_notification.text``, one per line."""
    lines = []
    for module, output in _process_outputs(process):
        info = output.get("__mercure_notification")
        if isinstance(info, dict) and info.get("text"):
            lines.append(f"{module}: {info['text']}")
    return "\n".join(lines)


#: Longest case id quoted in a fallback text.
_FALLBACK_ID_CHARS = 200


def fallback_text(rule: str, event: str, task_id: str, why: str) -> str:
    """What is sent instead of a text that passed a render limit: short, and says where to look."""
    case = task_id if len(task_id) <= _FALLBACK_ID_CHARS else f"{task_id[:_FALLBACK_ID_CHARS]}..."
    return (
        f"Rule {rule}: {event} for case {case}. The rule's notification text could not be "
        f"rendered ({why}); see the dispatcher's log."
    )


@dataclass
class CaseNotification:
    """What one rule announces for one case; a channel that could not be rendered is None."""

    rule: str
    event: str
    task_id: str
    webhook_body: str | None = None
    email_subject: str | None = None
    email_body: str | None = None
    problems: list[str] = field(default_factory=list)


def render_case_notification(
    rule: RuleNotification, event: str, task: Task, phi_notifications: bool
) -> CaseNotification | None:
    """The rule's announcement of ``event`` for ``task``, or None when the rule sends none.

    mercure logs a payload it cannot render and goes on; a broken channel is left out here and
    its reason is kept, so the other channel still goes. A text that passed a render limit is
    sent as :func:`fallback_text` (a webhook gets it as ``{"text": ...}``), with the reason kept.
    """
    if not rule.announces or not rule.sends(event, notification_requested(task.process)):
        return None
    details = custom_details(task.process)
    out = CaseNotification(rule.rule, event, task.id)
    if rule.webhook:
        try:
            out.webhook_body = webhook_body(rule, event, task, phi_notifications, details)
        except RenderLimitError as exc:
            text = fallback_text(rule.rule, event, task.id, str(exc))
            out.webhook_body = json.dumps({"text": text})
            out.problems.append(f"webhook payload of rule {rule.rule}: {exc}; sent a fallback")
        except Exception as exc:  # Jinja and JSON errors alike: mercure sends nothing
            out.problems.append(f"webhook payload of rule {rule.rule}: {exc}; not sent")
    if rule.email:
        try:
            out.email_subject, out.email_body = email_text(
                rule, event, task, phi_notifications, details
            )
        except RenderLimitError as exc:
            out.email_subject = f"{SUBJECT_PREFIX}Rule {rule.rule}: {event}"
            out.email_body = fallback_text(rule.rule, event, task.id, str(exc))
            out.problems.append(f"e-mail body of rule {rule.rule}: {exc}; sent a fallback")
        except Exception as exc:
            out.problems.append(f"e-mail body of rule {rule.rule}: {exc}; not sent")
    return out
