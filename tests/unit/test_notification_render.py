"""Notification text is data: mercure's placeholders are template variables, and a render that
passes its time or size limit sends a short fallback without holding up the event loop."""

from __future__ import annotations

import asyncio
import copy
import json
import time
from typing import Any

import pytest

from flows.case_events import render_notification
from tasks.notification_payload import COMPLETED, ERROR, RuleNotification, email_text, webhook_body
from tasks.taskjson import Task, parse_task
from tasks.template_render import TIME_LIMIT_SECONDS, RenderLimitError, render_bounded
from tests.unit.mercure_task import MERCURE_TASK

INJECTED = "{{ 7*7 }}{% for x in range(3) %}x{% endfor %}"
HUGE_LOOPS = (
    "{% for a in range(100000) %}{% for b in range(100000) %}{% for c in range(100000) %}"
    "{% endfor %}{% endfor %}{% endfor %}"
)


def task(task_id: str = "case-1", **info: Any) -> Task:
    raw = copy.deepcopy(MERCURE_TASK)
    raw["id"] = task_id
    raw["info"].update(info)
    return parse_task(raw)


def rule(**fields: Any) -> RuleNotification:
    return RuleNotification.from_mercure("ct", {"notification_webhook": "http://h/", **fields})


def test_a_case_id_holding_template_code_is_sent_literally() -> None:
    hook = rule(
        notification_payload='"text": "@task_id@ @rule@ @event@", "id": "{{ task_id }}"',
        notification_payload_body="@task_id@",
    )
    body = json.loads(webhook_body(hook, COMPLETED, task(INJECTED), False))
    assert body == {"text": f"{INJECTED} ct COMPLETED", "id": INJECTED}
    mail = rule(notification_email="a@x", notification_email_body="case @task_id@")
    assert email_text(mail, ERROR, task(INJECTED), False)[1] == f"case {INJECTED}"


def test_placeholders_inside_template_code_still_work_as_in_mercure() -> None:
    """mercure pasted the values in before parsing, so a placeholder in a string literal was
    compared, filtered, looked up: the same happens with the variable."""
    hook = rule(
        notification_payload=(
            '"e": "{% if "@event@" == "ERROR" %}failed{% else %}sent{% endif %}", '
            '"u": "{{ "@rule@-@task_id@" | upper }}", "k": "{{ {"@event@": 1}["ERROR"] }}"'
        )
    )
    assert json.loads(webhook_body(hook, ERROR, task("c1"), False)) == {
        "e": "failed",
        "u": "CT-C1",
        "k": "1",
    }


def test_huge_nested_loops_send_the_fallback_within_the_limit_and_the_loop_keeps_running() -> None:
    hook = rule(
        notification_payload='"text": "' + HUGE_LOOPS + '"',
        notification_email="a@x",
        notification_email_body=HUGE_LOOPS,
    )

    async def scenario() -> tuple[Any, float, float]:
        gaps: list[float] = []
        done = asyncio.Event()

        async def ticker() -> None:
            last = time.monotonic()
            while not done.is_set():
                await asyncio.sleep(0.01)
                gaps.append(time.monotonic() - last)
                last = time.monotonic()

        ticking = asyncio.create_task(ticker())
        await asyncio.sleep(0.05)
        started = time.monotonic()
        note = await render_notification(hook, COMPLETED, task("c1"), False)
        elapsed = time.monotonic() - started
        done.set()
        await ticking
        return note, elapsed, max(gaps)

    note, elapsed, worst_gap = asyncio.run(scenario())
    assert note is not None
    assert note.webhook_body is not None
    text = json.loads(note.webhook_body)["text"]
    assert text.startswith("Rule ct: COMPLETED for case c1.")
    assert "could not be rendered" in text
    assert note.email_subject == "[Mercure] Rule ct: COMPLETED"
    assert note.email_body is not None
    assert note.email_body.startswith("Rule ct: COMPLETED for case c1.")
    assert len(note.problems) == 2
    # two renders (webhook and mail), each stopped at the limit; a fresh worker for the second
    assert elapsed < 2 * TIME_LIMIT_SECONDS + 5.0
    assert worst_gap < 0.5, f"the event loop stalled for {worst_gap:.2f} s"


def test_output_over_the_size_limit_is_refused() -> None:
    with pytest.raises(RenderLimitError, match="longer than"):
        render_bounded("{% for a in range(100000) %}{{ 'x' * 100 }}{% endfor %}", {})
    hook = rule(notification_payload='"text": "{{ "x" * 1000000 }}"')
    body = json.loads(webhook_body_or_fallback(hook))
    assert "could not be rendered" in body["text"]
    assert render_bounded("ok {{ v }}", {"v": 1}) == "ok 1", "the next render works"


def webhook_body_or_fallback(hook: RuleNotification) -> str:
    from tasks.notification_payload import render_case_notification

    note = render_case_notification(hook, COMPLETED, task("c1"), False)
    assert note is not None
    assert note.webhook_body is not None
    return note.webhook_body
