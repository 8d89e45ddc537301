"""mercure's cleaner rules on real folders: age by folder mtime, off-peak only, emergency order."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from tasks.cleaner import (
    CleanReport,
    DiskUsage,
    SentCase,
    clean_success,
    emergency_plan,
    regular_plan,
)

from .entry_helpers import as_service_user, fifo_at, finishes, give_to_service_user, unblock

DAY = 86400.0
NOW = 1_800_000_000.0


def sent_case(root: Path, name: str, age: float, size: int = 1000) -> Path:
    case = root / name
    case.mkdir(parents=True)
    (case / "task.json").write_text(json.dumps({"id": f"id-{name}"}))
    (case / "a.dcm").write_bytes(b"\0" * size)
    os.utime(case, (NOW - age, NOW - age))
    return case


def names(root: Path) -> set[str]:
    return {p.name for p in root.iterdir()} if root.exists() else set()


def roomy(_path: Path) -> DiskUsage:
    return DiskUsage(total=100, used=10)


def clean(
    success: Path,
    *,
    offpeak_now: bool = True,
    retention: float = 3 * DAY,
    emergency_percentage: float = 90,
    now: float = NOW,
    usage: Callable[[Path], DiskUsage] = roomy,
) -> CleanReport:
    """One pass with the settings most tests share (three days, 90 %, a roomy disk), so that each
    test spells out only the setting it is about."""
    return clean_success(
        success,
        retention=retention,
        emergency_percentage=emergency_percentage,
        offpeak_now=offpeak_now,
        now=now,
        usage=usage,
    )


def test_only_cases_older_than_the_retention_go_and_only_off_peak(tmp_path: Path) -> None:
    success = tmp_path / "success"
    sent_case(success, "old", 4 * DAY)
    sent_case(success, "edge", 3 * DAY)  # exactly the retention: kept (mercure: strictly older)
    sent_case(success, "young", 1 * DAY)

    peak = clean(success, offpeak_now=False)
    assert peak.removed == []
    assert names(success) == {"old", "edge", "young"}

    offpeak = clean(success, offpeak_now=True)
    assert offpeak.removed == ["id-old"]
    assert not offpeak.emergency
    assert names(success) == {"edge", "young"}


def test_claimed_locked_and_symlinked_folders_are_left_alone(tmp_path: Path) -> None:
    success = tmp_path / "success"
    (sent_case(success, "claimed", 9 * DAY) / ".processing").touch()
    (sent_case(success, "locked", 9 * DAY) / ".lock").touch()
    elsewhere = sent_case(tmp_path / "elsewhere", "precious", 9 * DAY)
    (success / "link").symlink_to(elsewhere)
    (success / "stray.txt").write_text("not a case")
    clean(success, retention=0)
    assert names(success) == {"claimed", "locked", "link", "stray.txt"}
    assert (elsewhere / "a.dcm").exists()


def test_emergency_plan_takes_the_oldest_until_under_the_threshold() -> None:
    cases = [SentCase(Path(n), NOW - age, 10) for n, age in (("b", 2), ("a", 3), ("c", 1))]
    usage = DiskUsage(total=100, used=95)  # 90 %: 5 bytes to clear
    assert [c.path.name for c in emergency_plan(cases, usage, 90)] == ["a"]
    assert [c.path.name for c in emergency_plan(cases, DiskUsage(100, 111), 90)] == ["a", "b", "c"]
    assert emergency_plan(cases, DiskUsage(100, 90), 90) == []
    assert [c.path.name for c in regular_plan(cases, NOW, 1.5)] == ["a", "b"]


def test_emergency_clean_runs_outside_the_window_and_leaves_young_cases(tmp_path: Path) -> None:
    success = tmp_path / "success"
    for name, age in (("c1", 3.0), ("c2", 2.0), ("c3", 1.0)):
        sent_case(success, name, age)

    def usage(_path: Path) -> DiskUsage:
        return DiskUsage(total=100, used=95)  # 5 units over 90 %

    report = clean(success, retention=DAY, offpeak_now=False, now=time.time(), usage=usage)
    assert report.emergency
    assert report.removed == ["id-c1"]  # one case's blocks (4096) clear the 5 units
    assert names(success) == {"c2", "c3"}


@pytest.mark.parametrize("missing", [True, False])
def test_a_missing_or_empty_success_folder_is_no_error(tmp_path: Path, missing: bool) -> None:
    success = tmp_path / "success"
    if not missing:
        success.mkdir()
    report = clean(success, retention=0, emergency_percentage=1)
    assert report.removed == []


# --------------------------------------------------------------------------------------------
# one entry costs only itself (issue 17): the pass goes on past what it cannot handle


def test_pass_survives_a_folder_it_cannot_read(shared_root: Path) -> None:
    success = shared_root / "success"
    old = sent_case(success, "old", 4 * DAY)
    give_to_service_user(old)
    locked = sent_case(success, "locked", 5 * DAY)  # root's, mode 000
    locked.chmod(0o000)

    assert as_service_user(lambda: clean(success).removed) == ["id-old"]
    assert names(success) == {"locked"}


def test_pass_never_blocks_on_a_fifo_task_json(tmp_path: Path) -> None:
    success = tmp_path / "success"
    sent_case(success, "old", 4 * DAY)
    odd = sent_case(success, "odd", 5 * DAY)
    (odd / "task.json").unlink()
    fifo_at(odd / "task.json")
    os.utime(odd, (NOW - 5 * DAY, NOW - 5 * DAY))
    try:
        report = finishes(lambda: clean(success))
    finally:
        unblock(odd / "task.json")
    assert sorted(report.removed) == ["id-old", "odd"]
    assert names(success) == set()
