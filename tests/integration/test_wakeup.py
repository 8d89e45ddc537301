"""The dispatcher loop claims a ready case within ~100 ms of it becoming ready, by events alone.

The scan interval is an hour here, so only a file-system event can explain a fast claim. Three
ways a case becomes ready are covered: its ``.lock`` removed (mercure's router), the whole folder
moved into outgoing/ (scripts), ``task.json`` moved into place last. The claim time is read by a
spy around the real ``claim_case``.
"""

from __future__ import annotations

import asyncio
import json
import os
import statistics
import time
from pathlib import Path

import pytest

from blocks.dummy import DummyTarget
from tests.cases import make_case, task_json
from tests.dispatch_env import DispatchEnv

pytestmark = pytest.mark.timeout(180)

ROUNDS = 3  # per way of becoming ready


def test_ready_case_is_claimed_on_the_event_not_the_interval(
    env: DispatchEnv, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from blocks.settings import DispatcherSettings
    from flows import sweep
    from tasks import attempt_claim

    env.save_settings(dispatcher_scan_interval=3600)
    env.save_target(DummyTarget(), "dummy")
    claimed: dict[str, float] = {}
    real_claim = attempt_claim.claim_case  # where the loop's claims are taken

    def spy(case_dir: Path, flow_run_id: str | None = None) -> bool:
        took = real_claim(case_dir, flow_run_id)
        if took:
            claimed.setdefault(case_dir.name, time.monotonic())
        return took

    monkeypatch.setattr(attempt_claim, "claim_case", spy)
    staging = tmp_path / "staging"
    staging.mkdir()

    def unlocked() -> tuple[str, float]:
        case = make_case(staging, ["dummy"])
        (case / ".lock").touch()  # as mercure's router writes it ...
        case = case.rename(env.outgoing / case.name)
        time.sleep(0.2)
        ready = time.monotonic()
        (case / ".lock").unlink()  # ... and ready now
        return case.name, ready

    def moved_in() -> tuple[str, float]:
        case = make_case(staging, ["dummy"])
        ready = time.monotonic()
        case.rename(env.outgoing / case.name)
        return case.name, ready

    def task_json_last() -> tuple[str, float]:
        case = make_case(staging, ["dummy"])
        (case / "task.json").unlink()
        case = case.rename(env.outgoing / case.name)  # not ready: no task.json
        time.sleep(0.2)
        tmp = case / ".task.json.tmp"
        tmp.write_text(json.dumps(task_json(case.name, ["dummy"])))
        ready = time.monotonic()
        os.replace(tmp, case / "task.json")
        return case.name, ready

    settings = DispatcherSettings.load("default")

    async def scenario() -> list[float]:
        dispatcher = sweep.Dispatcher(settings)
        stop = asyncio.Event()
        loop = asyncio.create_task(dispatcher.run_forever(stop))
        await asyncio.sleep(1.0)  # the watcher is up
        latencies = []
        try:
            for make_ready in [unlocked, moved_in, task_json_last] * ROUNDS:
                name, ready = await asyncio.to_thread(make_ready)
                deadline = time.monotonic() + 30
                while not (env.success / name).is_dir() and time.monotonic() < deadline:
                    await asyncio.sleep(0.01)
                assert name in claimed, f"{make_ready.__name__}: case {name} never claimed"
                latencies.append(claimed[name] - ready)
        finally:
            stop.set()
            await loop
        return latencies

    latencies = asyncio.run(scenario())

    assert max(latencies) < 5, latencies  # never the one-hour interval
    assert statistics.median(latencies) <= 0.1, latencies
    assert len(list(env.success.iterdir())) == 3 * ROUNDS
