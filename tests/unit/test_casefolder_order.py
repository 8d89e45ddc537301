"""tasks/casefolder.py, which case goes first: the off-peak window, a case's priority from its
rules, and mercure's two-urgent-then-one-normal order."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import pytest

from tasks.casefolder import (
    Candidate,
    case_priority,
    is_offpeak,
    order_cases,
)
from tasks.taskjson import parse_task

from .casefolder_helpers import PRIORITIES, task_with

# --------------------------------------------------------------------------------------------
# off-peak window


@pytest.mark.parametrize(
    ("start", "end", "now", "expected"),
    [
        ("08:00", "17:00", "12:00", True),
        ("08:00", "17:00", "08:00", True),  # inclusive start
        ("08:00", "17:00", "17:00", True),  # inclusive end
        ("08:00", "17:00", "07:59", False),
        ("08:00", "17:00", "17:01", False),
        ("22:00", "06:00", "23:30", True),  # over midnight
        ("22:00", "06:00", "00:00", True),
        ("22:00", "06:00", "03:00", True),
        ("22:00", "06:00", "22:00", True),
        ("22:00", "06:00", "06:00", True),
        ("22:00", "06:00", "06:01", False),
        ("22:00", "06:00", "12:00", False),
        ("22:00", "06:00", "21:59", False),
    ],
)
def test_is_offpeak_window(start, end, now, expected):
    assert is_offpeak(start, end, dt.time.fromisoformat(now)) is expected


@pytest.mark.parametrize("now", ["00:00", "09:00", "09:01", "23:59"])
def test_is_offpeak_start_equals_end_means_always(now):
    assert is_offpeak("09:00", "09:00", dt.time.fromisoformat(now)) is True


@pytest.mark.parametrize(
    ("start", "end"),
    [("", "06:00"), ("22:00", "late"), ("25:00", "06:00"), ("22h", "6h"), (None, "06:00")],
)
def test_is_offpeak_unparsable_means_always(start, end):
    assert is_offpeak(start, end, dt.time(12, 0)) is True


# --------------------------------------------------------------------------------------------
# priority


def test_priority_of_applied_rule():
    task = parse_task(task_with(applied="stroke"))

    assert case_priority(task, PRIORITIES) == "urgent"


def test_applied_rule_wins_over_triggered_rules():
    task = parse_task(task_with(applied="ct_to_pacs", triggered={"stroke": True}))

    assert case_priority(task, PRIORITIES) == "normal"


def test_unknown_applied_rule_falls_back_to_triggered_rules():
    task = parse_task(task_with(applied="deleted_rule", triggered={"stroke": True}))

    assert case_priority(task, PRIORITIES) == "urgent"


def test_highest_triggered_rule_wins_even_if_listed_later():
    task = parse_task(task_with(triggered={"ct_to_pacs": True, "research": True, "stroke": True}))

    assert case_priority(task, PRIORITIES) == "urgent"


def test_normal_beats_offpeak_among_triggered_rules():
    task = parse_task(task_with(triggered={"research": True, "ct_to_pacs": True}))

    assert case_priority(task, PRIORITIES) == "normal"


def test_offpeak_from_triggered_rules():
    # mercure never yielded offpeak for series-level route tasks (quirk fixed).
    task = parse_task(task_with(triggered={"research": True}))

    assert case_priority(task, PRIORITIES) == "offpeak"


def test_unknown_triggered_rules_are_normal():
    task = parse_task(task_with(triggered={"gone": True, "also_gone": True}))

    assert case_priority(task, PRIORITIES) == "normal"


def test_string_triggered_rules_are_normal():
    task = parse_task(task_with(triggered=""))

    assert case_priority(task, PRIORITIES) == "normal"


def test_unknown_priority_value_counts_as_normal():
    task = parse_task(task_with(applied="weird"))

    assert case_priority(task, {"weird": "asap"}) == "normal"


# --------------------------------------------------------------------------------------------
# ordering


def cand(name: str, priority: str, mtime: float) -> Candidate:
    return Candidate(Path(name), parse_task(task_with()), priority, mtime)


def names(cands: list[Candidate]) -> list[str]:
    return [c.path.name for c in cands]


def urgent(*mtimes: float) -> list[Candidate]:
    return [cand(f"U{int(t)}", "urgent", t) for t in mtimes]


def normal(*mtimes: float) -> list[Candidate]:
    return [cand(f"N{int(t)}", "normal", t) for t in mtimes]


# (candidates, offpeak_now, the order they are dispatched in); a case's name says its priority
# and, within its priority, its age: N2 is the second-oldest normal case.
ORDERS = [
    pytest.param(
        [
            cand("N2", "normal", 20),
            *urgent(3, 1),
            cand("N3", "normal", 30),
            *urgent(5),
            cand("N1", "normal", 10),
            *urgent(2, 4),
        ],
        False,
        ["U1", "U2", "N1", "U3", "U4", "N2", "U5", "N3"],
        id="interleaves_two_urgent_then_one_normal_oldest_first",
    ),
    # mercure aborted the cycle after two urgent cases when no normal one was left.
    pytest.param(urgent(4, 2, 3, 1), False, ["U1", "U2", "U3", "U4"], id="only_urgent_continues"),
    pytest.param(normal(3, 1, 2), False, ["N1", "N2", "N3"], id="only_normal"),
    pytest.param(
        [*urgent(1), *normal(1, 2, 3)],
        False,
        ["U1", "N1", "N2", "N3"],
        id="normal_continue_when_urgent_run_out",
    ),
    pytest.param([], True, [], id="empty"),
    pytest.param(
        [cand("N1", "normal", 1), cand("O1", "offpeak", 2), cand("U1", "urgent", 3)],
        False,
        ["U1", "N1"],
        id="offpeak_cases_wait_outside_the_window",
    ),
    pytest.param(
        [
            cand("N2", "normal", 3),
            cand("O1", "offpeak", 2),
            cand("N1", "normal", 1),
            cand("U1", "urgent", 9),
            cand("U2", "urgent", 10),
        ],
        True,
        ["U1", "U2", "N1", "O1", "N2"],
        id="offpeak_cases_are_normal_inside_the_window",
    ),
]


@pytest.mark.parametrize(("cands", "offpeak_now", "expected"), ORDERS)
def test_order(cands: list[Candidate], offpeak_now: bool, expected: list[str]) -> None:
    assert names(order_cases(cands, offpeak_now=offpeak_now)) == expected
