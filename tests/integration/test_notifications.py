"""mercure's rule notifications through Prefect automations, against real receivers.

``import-config`` turns the rules into automations on the real Prefect server; a case that
reaches success/ or error/ emits its event, and the server's automation calls an HTTP
receiver and an SMTP sink on 127.0.0.1 that record exactly what arrived. The expected bytes
are what mercure sends for the same rule and task (see tests/unit/test_notification_payload).
Automations fire asynchronously: each check polls with a deadline, then waits a little longer
to prove no second call follows.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from prefect.client.orchestration import get_client

from blocks.notifications import SMTP_SERVER_NAME, SmtpServer
from deployments.importer import import_mercure_config
from deployments.rule_automations import read_rule_automations
from tests.cases import make_case
from tests.dispatch_env import DispatchEnv
from tests.peers.recorders import HttpCall, Mail, recording_http_server, recording_smtp_sink

#: No second call may follow within this many seconds of the expected one.
QUIET_SECONDS = 4.0
DEADLINE_SECONDS = 60.0

RULE_A = {
    "rule": "True",
    "target": "share",
    "notification_payload": (
        '"text": "Rule @rule@: @event@ for @task_id@", "body": "{{ body }}", "mrn": "{{ mrn }}"'
    ),
    "notification_payload_body": 'Grüße <{{ acc }}> "q"',
    "notification_email": "ops@site.org, lead@site.org",
    "notification_email_body": "Case {{ task_id }} {{ event }} acc={{ acc }}",
    "notification_trigger_completion": True,
    "notification_trigger_error": True,
}
RULE_B = {
    "rule": "True",
    "target": "share",
    "notification_payload": '"text": "@rule@ @event@"',
    "notification_trigger_completion": True,
    "notification_trigger_error": False,
}


def mercure_json(env: DispatchEnv, tmp_path: Path, base: str, **changes: Any) -> Path:
    blocker = tmp_path / "blocker"
    blocker.write_text("a file where the broken target wants a folder")
    config: dict[str, Any] = {
        "outgoing_folder": str(env.outgoing),
        "success_folder": str(env.success),
        "error_folder": str(env.error),
        "retry_max": 2,
        "retry_delay": 0,
        "phi_notifications": False,
        "email_notification_from": "mercure@site.org",
        "targets": {
            "share": {"target_type": "folder", "folder": str(tmp_path / "share")},
            "broken": {"target_type": "folder", "folder": str(blocker / "share")},
        },
        "rules": {
            "A": {**RULE_A, "notification_webhook": f"{base}/hooks/A"},
            "B": {**RULE_B, "notification_webhook": f"{base}/hooks/B"},
        },
    }
    config.update(changes)
    path = tmp_path / "mercure.json"
    path.write_text(json.dumps(config))
    return path


def rule_automations() -> dict[str, Any]:
    async def read() -> dict[str, Any]:
        async with get_client() as client:
            return {a.name: a for a in await read_rule_automations(client)}

    return asyncio.run(read())


def settle(found: Callable[[], bool], what: str) -> None:
    """Wait until ``found``; then stay a while, so a duplicate would have time to arrive."""
    deadline = time.monotonic() + DEADLINE_SECONDS
    while not found():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {DEADLINE_SECONDS} s waiting for {what}")
        time.sleep(0.2)
    time.sleep(QUIET_SECONDS)


@pytest.fixture
def receivers() -> Iterator[tuple[str, list[HttpCall], int, list[Mail]]]:
    with recording_http_server() as (base, calls), recording_smtp_sink() as (port, mails):
        yield base, calls, port, mails


def test_rules_notify_as_mercure_does(
    env: DispatchEnv, tmp_path: Path, receivers: tuple[str, list[HttpCall], int, list[Mail]]
) -> None:
    base, calls, smtp_port, mails = receivers
    config = mercure_json(env, tmp_path, base)
    report = asyncio.run(import_mercure_config(config))
    expected = {
        "dicom-dispatch: rule A COMPLETED (webhook)",
        "dicom-dispatch: rule A COMPLETED (e-mail)",
        "dicom-dispatch: rule A ERROR (webhook)",
        "dicom-dispatch: rule A ERROR (e-mail)",
        "dicom-dispatch: rule B COMPLETED (webhook)",
    }
    assert set(rule_automations()) == expected
    assert {name for names in report.notifications.values() for name in names} == expected

    first = {name: a.id for name, a in rule_automations().items()}
    asyncio.run(import_mercure_config(config))  # idempotent: the same automations, updated
    assert {name: a.id for name, a in rule_automations().items()} == first

    # The site fills in its mail relay once; the rules' e-mail blocks point at that document.
    smtp = SmtpServer.load(SMTP_SERVER_NAME)
    assert smtp.sender == "mercure@site.org"
    smtp.host, smtp.port = "127.0.0.1", smtp_port
    smtp.save(SMTP_SERVER_NAME, overwrite=True)

    # Rule A's case reaches success/: one COMPLETED call to A's hook, none to B's; two mails.
    sent = make_case(env.outgoing, ["share"], applied_rule="A", triggered_rules={"A": True})
    assert env.dispatch(sent)["location"] == "success"
    settle(lambda: len(calls) >= 1 and len(mails) >= 2, "rule A's COMPLETED webhook and mails")
    (call,) = calls
    assert (call.method, call.path) == ("POST", "/hooks/A")
    assert call.headers["content-type"] == "application/json"
    assert call.body == (
        b'{"text": "Rule A: COMPLETED for ' + sent.name.encode() + b'", '
        b'"body": "Gr\\u00fc\\u00dfe <UNKNOWN> \\"q\\"", "mrn": "UNKNOWN"}'
    )
    assert sorted(m.recipients[0] for m in mails) == ["lead@site.org", "ops@site.org"]
    for mail in mails:
        message = mail.message
        assert mail.sender == "mercure@site.org"
        assert message["Subject"] == "[Mercure] Rule A: COMPLETED"
        assert message["To"] == mail.recipients[0]
        assert message.get_content_type() == "text/plain"
        assert message.get_content() == f"Case {sent.name} COMPLETED acc=\n"  # phi off
    calls.clear()
    mails.clear()

    # PHI allowed now, rule B gone: its automation goes, A's stay, the site's relay is kept.
    changed = json.loads(mercure_json(env, tmp_path, base, phi_notifications=True).read_text())
    del changed["rules"]["B"]
    config.write_text(json.dumps(changed))
    asyncio.run(import_mercure_config(config))
    assert set(rule_automations()) == {n for n in expected if " rule A " in n}
    assert SmtpServer.load(SMTP_SERVER_NAME).port == smtp_port

    # A failing case: nothing after the first attempt (a retry follows), one ERROR after the last.
    failing = make_case(env.outgoing, ["broken"], applied_rule="A", triggered_rules={"A": True})
    assert env.dispatch(failing)["location"] == "outgoing"
    time.sleep(QUIET_SECONDS)
    assert calls == []
    assert mails == []
    assert env.dispatch(failing)["location"] == "error"
    settle(lambda: len(calls) >= 1 and len(mails) >= 2, "rule A's ERROR webhook and mails")
    (call,) = calls
    assert call.path == "/hooks/A"
    assert call.body == (
        b'{"text": "Rule A: ERROR for ' + failing.name.encode() + b'", '
        b'"body": "Gr\\u00fc\\u00dfe <ACC0001> \\"q\\"", "mrn": "MRN0001"}'
    )
    assert len(mails) == 2
    assert {m.message["Subject"] for m in mails} == {"[Mercure] Rule A: ERROR"}
    assert {m.message.get_content() for m in mails} == {f"Case {failing.name} ERROR acc=ACC0001\n"}


def test_template_code_in_a_case_id_arrives_literally(
    env: DispatchEnv, tmp_path: Path, receivers: tuple[str, list[HttpCall], int, list[Mail]]
) -> None:
    """mercure pasted ``@task_id@`` into the template before rendering it: a case id
    ``{{ 7*7 }}`` arrived as ``49``. Here it arrives as it is."""
    base, calls, _, _ = receivers
    config = mercure_json(env, tmp_path, base)
    changed = json.loads(config.read_text())
    changed["rules"]["B"]["notification_payload"] = '"text": "@rule@ @event@ @task_id@"'
    config.write_text(json.dumps(changed))
    asyncio.run(import_mercure_config(config))

    case_id = "{{ 7*7 }}"
    sent = make_case(
        env.outgoing, ["share"], case_id=case_id, applied_rule="B", triggered_rules={"B": True}
    )
    assert env.dispatch(sent)["location"] == "success"
    settle(lambda: len(calls) >= 1, "rule B's COMPLETED webhook")
    (call,) = calls
    assert call.path == "/hooks/B"
    assert call.body == b'{"text": "B COMPLETED {{ 7*7 }}"}'
