"""The folder protocol through the real flows: retries, error/, collisions, HALT, order, claims."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from blocks.dummy import DummyTarget
from blocks.folder import FolderTarget
from tests.cases import make_case
from tests.dispatch_env import DispatchEnv


@pytest.fixture
def broken_folder(tmp_path: Path) -> str:
    blocker = tmp_path / "blocker"
    blocker.write_text("regular file")
    return str(blocker / "below")


def test_max_retries_moves_case_to_error_with_fail_stage(
    env: DispatchEnv, broken_folder: str
) -> None:
    env.save_target(FolderTarget(folder=broken_folder), "broken")
    env.save_settings(retry_max=3, retry_delay=0.0)
    case = make_case(env.outgoing, ["broken"])

    locations = [env.dispatch(case)["location"] for _ in range(3)]

    assert locations == ["outgoing", "outgoing", "error"]
    failed = env.error / case.name
    task = env.task(failed)
    assert task["info"]["fail_stage"] == "DISPATCHING"
    assert task["dispatch"]["retries"] == 2, "mercure does not persist the last count"
    assert task["dispatch"]["status"]["broken"]["state"] == "error"
    assert "Max retries" in (failed / "dispatch_error.txt").read_text()
    assert not (failed / ".processing").exists()


def test_retry_gate_holds_case_until_next_retry_at(env: DispatchEnv, broken_folder: str) -> None:
    from blocks.settings import DispatcherSettings
    from flows.sweep import Dispatcher

    env.save_target(FolderTarget(folder=broken_folder), "broken")
    env.save_settings(retry_max=5, retry_delay=3600.0)
    case = make_case(env.outgoing, ["broken"])
    assert env.dispatch(case)["location"] == "outgoing"
    due = env.task(case)["dispatch"]["next_retry_at"]
    assert due > time.time() + 3500

    settings = DispatcherSettings.load("default")
    result = asyncio.run(Dispatcher(settings).one_pass())
    assert result.dispatched == 0
    assert result.waiting_for_retry == 1
    assert env.task(case)["dispatch"]["retries"] == 1


def test_unknown_target_and_empty_list_go_to_error_at_once(env: DispatchEnv) -> None:
    env.save_target(DummyTarget(), "dummy")
    unknown = make_case(env.outgoing, ["dummy", "does_not_exist"])
    empty = make_case(env.outgoing, [])

    assert env.dispatch(unknown)["location"] == "error"
    assert env.dispatch(empty)["location"] == "error"
    assert "does_not_exist" in env.task(env.error / unknown.name)["info"]["fail_reason"]
    assert "No targets" in (env.error / empty.name / "dispatch_error.txt").read_text()


def test_collision_in_success_gets_isoformat_suffix(env: DispatchEnv) -> None:
    env.save_target(DummyTarget(), "dummy")
    case = make_case(env.outgoing, ["dummy"], case_id="same-name")
    (env.success / "same-name").mkdir()
    assert env.dispatch(case)["location"] == "success"
    [moved] = [p for p in env.success.iterdir() if p.name.startswith("same-name_")]
    from datetime import datetime

    datetime.fromisoformat(moved.name.removeprefix("same-name_"))
    assert (moved / "task.json").exists()


def test_restart_from_error_resends_only_unfinished(env: DispatchEnv, tmp_path: Path) -> None:
    good = tmp_path / "good"
    env.save_target(FolderTarget(folder=str(good)), "good")
    env.save_target(FolderTarget(folder=str(tmp_path / "f" / "x")), "later")
    (tmp_path / "f").write_text("file")
    env.save_settings(retry_max=1)
    case = make_case(env.outgoing, ["good", "later"])
    assert env.dispatch(case)["location"] == "error"

    (tmp_path / "f").unlink()
    result = env.dispatch(case.name)  # a case id in error/: restarted as mercure's UI does

    assert result["location"] == "success"
    assert len(list(good.iterdir())) == 1
    task = env.task(env.success / case.name)
    assert task["info"]["fail_stage"] is None


def test_invalid_task_json_is_quarantined_after_grace(env: DispatchEnv) -> None:
    from blocks.settings import DispatcherSettings
    from flows.sweep import Dispatcher

    env.save_settings(invalid_grace_seconds=1.0)
    bad = env.outgoing / "bad-case"
    bad.mkdir()
    (bad / "task.json").write_text("{not json")
    (bad / "x.dcm").write_bytes(b"data")
    empty = env.outgoing / "empty-dispatch"
    empty.mkdir()
    (empty / "task.json").write_text(json.dumps({"id": "x", "dispatch": {}}))
    dispatcher = Dispatcher(DispatcherSettings.load("default"))

    asyncio.run(dispatcher.one_pass())
    assert bad.is_dir(), "inside the grace period the folder stays"
    old = time.time() - 60
    for p in (bad, bad / "task.json", empty, empty / "task.json"):
        os.utime(p, (old, old))
    asyncio.run(dispatcher.one_pass())

    assert not bad.exists()
    assert not empty.exists()
    assert "not valid JSON" in (env.error / "bad-case" / "dispatch_error.txt").read_text()
    assert (env.error / "bad-case" / "x.dcm").read_bytes() == b"data"
    assert (env.error / "empty-dispatch" / "dispatch_error.txt").exists()


def test_stale_claim_of_dead_process_is_released_and_dispatched(env: DispatchEnv) -> None:
    from blocks.settings import DispatcherSettings
    from flows.sweep import Dispatcher

    env.save_target(DummyTarget(), "dummy")
    case = make_case(env.outgoing, ["dummy"])
    code = (
        "import sys; from pathlib import Path; from tasks.casefolder import claim_case; "
        "claim_case(Path(sys.argv[1]))"
    )
    subprocess.run([sys.executable, "-c", code, str(case)], check=True)
    assert (case / ".processing").exists()
    foreign = make_case(env.outgoing, ["dummy"])
    (foreign / ".processing").touch()  # mercure's own dispatcher: empty marker, left alone

    asyncio.run(Dispatcher(DispatcherSettings.load("default")).one_pass())  # releases the claim
    asyncio.run(Dispatcher(DispatcherSettings.load("default")).one_pass())  # dispatches

    assert (env.success / case.name).is_dir()
    assert foreign.is_dir()
    assert (foreign / ".processing").exists()


def test_priority_order_urgent_two_to_one(env: DispatchEnv, tmp_path: Path) -> None:
    from blocks.settings import DispatcherSettings
    from flows.sweep import Dispatcher

    env.save_target(FolderTarget(folder=str(tmp_path / "share")), "share")
    env.save_settings(num_proc=1, rule_priorities={"fast": "urgent", "slow": "normal"})
    cases = []
    for i, rule in enumerate(["slow", "slow", "fast", "fast", "fast", "fast"]):
        case = make_case(env.outgoing, ["share"], applied_rule=rule, case_id=f"{rule}-{i}")
        os.utime(case, (1000 + i, 1000 + i))
        cases.append(case)

    asyncio.run(Dispatcher(DispatcherSettings.load("default")).one_pass())

    done = sorted(env.success.iterdir(), key=lambda p: (p / "task.json").stat().st_mtime)
    assert [p.name.split("-")[0] for p in done] == ["fast", "fast", "slow", "fast", "fast", "slow"]


def test_offpeak_case_waits_outside_the_window(env: DispatchEnv) -> None:
    from blocks.settings import DispatcherSettings
    from flows.sweep import Dispatcher

    env.save_target(DummyTarget(), "dummy")
    now = time.localtime()
    closed = f"{(now.tm_hour + 2) % 24:02d}:00", f"{(now.tm_hour + 3) % 24:02d}:00"
    env.save_settings(
        rule_priorities={"night": "offpeak"}, offpeak_start=closed[0], offpeak_end=closed[1]
    )
    case = make_case(env.outgoing, ["dummy"], applied_rule="night")
    asyncio.run(Dispatcher(DispatcherSettings.load("default")).one_pass())
    assert case.is_dir()

    env.save_settings(
        rule_priorities={"night": "offpeak"}, offpeak_start="00:00", offpeak_end="00:00"
    )
    asyncio.run(Dispatcher(DispatcherSettings.load("default")).one_pass())
    assert (env.success / case.name).is_dir()


def test_lock_and_error_markers_keep_a_case_back(env: DispatchEnv) -> None:
    from blocks.settings import DispatcherSettings
    from flows.sweep import Dispatcher

    env.save_target(DummyTarget(), "dummy")
    locked = make_case(env.outgoing, ["dummy"])
    (locked / ".lock").touch()
    errored = make_case(env.outgoing, ["dummy"])
    (errored / ".error").touch()
    asyncio.run(Dispatcher(DispatcherSettings.load("default")).one_pass())
    assert locked.is_dir()
    assert errored.is_dir()
    (locked / ".lock").unlink()
    asyncio.run(Dispatcher(DispatcherSettings.load("default")).one_pass())
    assert (env.success / locked.name).is_dir()
    assert errored.is_dir()
