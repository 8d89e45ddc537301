"""mercure's notification texts, byte for byte.

The expected values are what mercure's ``trigger_notification_for_rule`` produces for the same
rule and task (``common/notification.py``: placeholders, sandboxed Jinja, ``body`` through
``htmlsafe_json_dumps``, ``json.loads("{" + payload + "}")`` then aiohttp's ``json.dumps``).
"""

from __future__ import annotations

import copy
from typing import Any

import pytest

from blocks.notifications import SmtpEmailNotification, SmtpServer
from tasks.notification_payload import (
    COMPLETED,
    ERROR,
    RuleNotification,
    announced_rules,
    custom_details,
    email_text,
    notification_requested,
    render_case_notification,
    webhook_body,
)
from tasks.taskjson import Task, parse_task
from tests.unit.mercure_task import CASE_ID, MERCURE_TASK

RULE = "ct_to_pacs"


def task(**info: Any) -> Task:
    raw = copy.deepcopy(MERCURE_TASK)
    raw["info"].update(info)
    return parse_task(raw)


def rule(**fields: Any) -> RuleNotification:
    return RuleNotification.from_mercure(RULE, {"notification_webhook": "http://h/", **fields})


PHI_PAYLOAD = '"acc": "{{ acc }}", "mrn": "{{ mrn }}", "name": "{{ patient_name }}"'


@pytest.mark.parametrize(
    ("fields", "phi", "event", "expected"),
    [
        pytest.param(
            {"notification_payload": '"text": "Rule @rule@: @event@ for @task_id@"'},
            False,
            COMPLETED,
            '{"text": "Rule ct_to_pacs: COMPLETED for ' + CASE_ID + '"}',
            id="placeholders",
        ),
        pytest.param({}, False, COMPLETED, "{}", id="empty payload"),
        pytest.param(
            {"notification_payload": PHI_PAYLOAD},
            False,
            ERROR,
            '{"acc": "UNKNOWN", "mrn": "UNKNOWN", "name": "UNKNOWN"}',
            id="phi off",
        ),
        pytest.param(
            {"notification_payload": PHI_PAYLOAD},
            True,
            ERROR,
            '{"acc": "ACC20250301", "mrn": "123456", "name": "DOE^JOHN"}',
            id="phi on",
        ),
        pytest.param(
            {
                "notification_payload": '"text": "{{ body }}"',
                "notification_payload_body": (
                    "Case <b>\"{{ task_id }}\"</b> & '{{ event }}' für Jörg ✓ {{ patient_name }}"
                    "\nline 2\n"
                ),
            },
            True,
            COMPLETED,
            '{"text": "Case <b>\\"'
            + CASE_ID
            + "\\\"</b> & 'COMPLETED' f\\u00fcr J\\u00f6rg \\u2713 DOE^JOHN\\nline 2\"}",
            id="body quoting and unicode",
        ),
        pytest.param(
            {
                "notification_payload": (
                    '"event": "{{ event|lower }}", "serial": "{{ DeviceSerialNumber }}", '
                    '"details": "{% if details %}{{ details }}{% else %}none{% endif %}", '
                    '"n": 1.50, "list": [1, 2e1], "nested": {"rule": "@rule@"}, "u": "Zürich"'
                )
            },
            False,
            COMPLETED,
            '{"event": "completed", "serial": "None", "details": "none", "n": 1.5, '
            '"list": [1, 20.0], "nested": {"rule": "ct_to_pacs"}, "u": "Z\\u00fcrich"}',
            id="jinja and json re-encoding",
        ),
    ],
)
def test_webhook_body_is_mercures(
    fields: dict[str, str], phi: bool, event: str, expected: str
) -> None:
    assert webhook_body(rule(**fields), event, task(), phi) == expected


def test_a_missing_patient_name_is_empty_in_a_webhook_and_none_in_a_mail() -> None:
    nameless = task(patient_name=None)
    assert (
        webhook_body(rule(notification_payload='"n": "{{ patient_name }}"'), ERROR, nameless, True)
        == '{"n": ""}'
    )
    mail = rule(notification_email="a@x", notification_email_body="{{ patient_name }}")
    assert email_text(mail, ERROR, nameless, True) == ("[Mercure] Rule ct_to_pacs: ERROR", "None")


def test_email_subject_and_body_are_mercures() -> None:
    mail = rule(
        notification_email="a@x",
        notification_email_body=(
            "Case {{ task_id }} of {{ patient_name }} ({{ acc }}): @event@ {{ DeviceSerialNumber }}"
        ),
    )
    subject, text = email_text(mail, ERROR, task(), True)
    assert subject == "[Mercure] Rule ct_to_pacs: ERROR"
    assert text == f"Case {CASE_ID} of DOE^JOHN (ACC20250301): ERROR None"
    # phi off: the e-mail's context has no acc/mrn/patient_name at all (mercure), so they vanish
    _, hidden = email_text(mail, ERROR, task(), False)
    assert hidden == f"Case {CASE_ID} of  (): ERROR None"


def test_a_payload_that_is_not_json_members_is_refused() -> None:
    with pytest.raises(ValueError, match="Expecting"):
        webhook_body(
            rule(notification_payload='{"text": "braces are added by mercure"}'),
            COMPLETED,
            task(),
            False,
        )


def test_rules_considered_are_the_applied_rule_or_the_triggered_ones() -> None:
    assert announced_rules(task(applied_rule="ct", triggered_rules={"a": True})) == ["ct"]
    assert announced_rules(task(applied_rule="", triggered_rules={"a": True, "b": True})) == [
        "a",
        "b",
    ]
    assert announced_rules(task(applied_rule=None, triggered_rules="a")) == []


def test_triggers_decide_which_events_are_sent() -> None:
    both = rule()
    assert both.events() == [COMPLETED, ERROR]
    only_error = rule(notification_trigger_completion=False)
    assert only_error.events() == [ERROR]
    assert render_case_notification(only_error, COMPLETED, task(), False) is None
    on_request = rule(
        notification_trigger_completion=False,
        notification_trigger_error=False,
        notification_trigger_completion_on_request=True,
    )
    assert on_request.events() == [COMPLETED, ERROR]
    assert render_case_notification(on_request, COMPLETED, task(), False) is None
    requested = copy.deepcopy(MERCURE_TASK)
    requested["process"] = {
        "module_name": "ai",
        "output": {"__mercure_notification": {"requested": True, "text": "found 2"}},
    }
    note = render_case_notification(
        RuleNotification.from_mercure(
            RULE, {**on_request.as_mercure(), "notification_payload": '"d": "{{ details }}"'}
        ),
        ERROR,
        parse_task(requested),
        False,
    )
    assert note is not None
    assert note.webhook_body == '{"d": "ai: found 2"}'
    assert RuleNotification.from_mercure(RULE, {}).events() == []  # no webhook, no e-mail


def test_details_and_requests_come_from_processing_outputs() -> None:
    steps = [
        {"module_name": "a", "output": {"__mercure_notification": {"text": "one"}}},
        {"module_name": "b", "output": None},
        {
            "module_name": "c",
            "output": {"__mercure_notification": {"text": "two", "requested": True}},
        },
    ]
    assert custom_details(steps) == "a: one\nc: two"
    assert notification_requested(steps)
    assert custom_details({}) == ""
    assert not notification_requested({})


def test_a_broken_channel_is_left_out_and_the_other_still_goes() -> None:
    both = rule(
        notification_payload='"x": ', notification_email="a@x", notification_email_body="hi"
    )
    note = render_case_notification(both, COMPLETED, task(), False)
    assert note is not None
    assert note.webhook_body is None
    assert note.email_body == "hi"
    assert note.problems
    assert "webhook payload" in note.problems[0]


def test_rule_fields_round_trip_with_mercures_names() -> None:
    spec = {
        "notification_webhook": "http://h/",
        "notification_payload": "p",
        "notification_payload_body": "b",
        "notification_email": "a@x, b@y",
        "notification_email_body": "e",
        "notification_email_type": "html",
        "notification_trigger_completion": False,
        "notification_trigger_error": True,
        "notification_trigger_completion_on_request": False,
    }
    parsed = RuleNotification.from_mercure(RULE, {**spec, "target": "pacs"})
    assert parsed.as_mercure() == spec
    assert parsed.addresses == ["a@x", "b@y"]


def test_the_mail_is_built_as_mercure_builds_it() -> None:
    mail = SmtpEmailNotification(
        smtp=SmtpServer(sender="mercure@site.org"), to=["a@x.org", "b@y.org"], email_type="html"
    )
    first, second = mail.messages("<p>Grüße</p>", "[Mercure] Rule ct: COMPLETED")
    assert first["Subject"] == "[Mercure] Rule ct: COMPLETED"
    assert first["From"] == "mercure@site.org"
    assert (first["To"], second["To"]) == ("a@x.org", "b@y.org")
    assert first.get_content_type() == "text/html"
    assert first.get_content() == "<p>Grüße</p>\n"
