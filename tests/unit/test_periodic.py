"""Periodic work: a failed pass never ends the loop, stop never waits out an interval, and every
loop of the service is one declared ``Periodic`` listed in architecture §2.4."""

from __future__ import annotations

import ast
import asyncio
import logging
import re
import threading
import time
from pathlib import Path

import pytest

from tasks.periodic import Periodic

ROOT = Path(__file__).resolve().parents[2]


def test_a_failed_pass_is_logged_and_the_loop_goes_on(caplog: pytest.LogCaptureFixture) -> None:
    passes: list[int] = []

    async def step() -> None:
        passes.append(len(passes))
        if len(passes) == 1:
            raise OSError("the folder is gone")
        if len(passes) == 3:
            stop.set()

    stop = asyncio.Event()
    with caplog.at_level(logging.WARNING):
        asyncio.run(
            Periodic("probe", step, 0.01, wait_first=False, error_level=logging.WARNING).run(stop)
        )
    assert passes == [0, 1, 2]
    assert [r.levelno for r in caplog.records] == [logging.WARNING]


def test_stop_ends_the_pause_at_once() -> None:
    passes: list[float] = []

    async def main() -> float:
        stop = asyncio.Event()
        task = asyncio.create_task(Periodic("slow", lambda: passes.append(1), 3600).run(stop))
        await asyncio.sleep(0.05)
        begun = time.monotonic()
        stop.set()
        await asyncio.wait_for(task, 5)
        return time.monotonic() - begun

    assert asyncio.run(main()) < 1
    assert passes == []  # waits first, as mercure's loops: no pass before the first interval


def test_wake_cuts_the_pause_short_and_is_cleared() -> None:
    passes: list[float] = []

    async def main() -> None:
        stop, wake = asyncio.Event(), asyncio.Event()
        task = asyncio.create_task(
            Periodic("woken", lambda: passes.append(1), 3600).run(stop, wake)
        )
        await asyncio.sleep(0.05)
        wake.set()
        await asyncio.sleep(0.05)
        assert passes == [1]
        assert not wake.is_set()
        stop.set()
        await asyncio.wait_for(task, 5)

    asyncio.run(main())


def test_backoff_spaces_passes_out_after_failures_in_a_row() -> None:
    periodic = Periodic("api", lambda: None, 2.0, backoff=8)
    assert [periodic.delay(n) for n in (0, 1, 3, 8, 20)] == [2.0, 2.0, 6.0, 16.0, 16.0]
    assert Periodic("plain", lambda: None, 2.0).delay(5) == 2.0


def test_the_interval_is_asked_before_every_pause() -> None:
    interval = {"seconds": 5.0}
    periodic = Periodic("settings", lambda: None, lambda: interval["seconds"])
    assert periodic.delay() == 5.0
    interval["seconds"] = 60.0  # changed in the settings block while the service runs
    assert periodic.delay() == 60.0


def test_until_success_stops_after_the_first_good_pass() -> None:
    tries: list[int] = []

    def prepare() -> None:
        tries.append(1)
        if len(tries) < 3:
            raise ConnectionError("the API is not up yet")

    stop = asyncio.Event()
    periodic = Periodic(
        "start", prepare, 0.01, wait_first=False, until_success=True, error_level=logging.DEBUG
    )
    asyncio.run(asyncio.wait_for(periodic.run(stop), 5))
    assert len(tries) == 3
    assert not stop.is_set()


def test_a_thread_runs_a_sync_step_and_survives_its_failures() -> None:
    passes: list[int] = []
    stop = threading.Event()

    def step() -> None:
        passes.append(1)
        if len(passes) == 1:
            raise RuntimeError("one bad folder")

    thread = Periodic("claim-heartbeat-test", step, 0.01, error_level=logging.DEBUG).start_thread(
        stop
    )
    assert thread.daemon
    assert thread.name == "claim-heartbeat-test"
    deadline = time.monotonic() + 5
    while len(passes) < 3 and time.monotonic() < deadline:
        time.sleep(0.01)
    stop.set()
    thread.join(5)
    assert len(passes) >= 3
    assert not thread.is_alive()


def _declared_services() -> set[str]:
    """The names given to ``Periodic(...)`` anywhere in the service's packages."""
    names = set()
    for package in ("blocks", "tasks", "flows", "deployments"):
        for path in (ROOT / package).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text(), str(path))):
                if (
                    isinstance(node, ast.Call)
                    and isinstance(node.func, ast.Name)
                    and node.func.id == "Periodic"
                    and node.args
                    and isinstance(node.args[0], ast.Constant)
                ):
                    names.add(str(node.args[0].value))
    return names


def _documented_services() -> set[str]:
    text = (ROOT / "docs" / "architecture.md").read_text()
    table = text.split("### 2.4 Periodic services", 1)[1].split("\n#", 1)[0]
    return set(re.findall(r"^\| `([^`]+)` \|", table, flags=re.MULTILINE))


def test_every_loop_is_a_declared_periodic_service_in_the_table() -> None:
    declared = _declared_services()
    assert len(declared) == 9, sorted(declared)
    assert declared == _documented_services()
