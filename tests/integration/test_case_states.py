"""The Prefect UI tells the truth about a case: final states, UI Retry, crashed ghost runs.

Each test reads the case's flow runs back from the real Prefect server and checks them against
where the case folder is.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterTags
from prefect.client.schemas.objects import FlowRun, StateType
from prefect.client.schemas.sorting import FlowRunSort
from prefect.states import Running

from blocks.folder import FolderTarget
from flows.case_states import RETRY_PENDING, SKIPPED
from tests.cases import make_case
from tests.dispatch_env import DispatchEnv


def case_runs(case_id: str) -> list[FlowRun]:
    """The case's flow runs, oldest first."""

    async def read() -> list[FlowRun]:
        async with get_client() as client:
            return await client.read_flow_runs(
                flow_run_filter=FlowRunFilter(tags=FlowRunFilterTags(all_=[f"case:{case_id}"])),
                sort=FlowRunSort.EXPECTED_START_TIME_ASC,
                limit=50,
            )

    return asyncio.run(read())


def one_run(run_id: Any) -> FlowRun:
    async def read() -> FlowRun:
        async with get_client() as client:
            return await client.read_flow_run(run_id)

    return asyncio.run(read())


def blocked_folder(tmp_path: Path) -> tuple[FolderTarget, Path]:
    """A Folder target that fails (its parent is a file) until the returned file is removed."""
    blocker = tmp_path / "blocker"
    blocker.write_text("not a folder")
    return FolderTarget(folder=str(blocker / "share")), blocker


def test_failed_attempts_are_failed_runs_told_apart_by_name(
    env: DispatchEnv, tmp_path: Path
) -> None:
    env.save_settings(retry_max=2)
    target, _ = blocked_folder(tmp_path)
    env.save_target(target, "share")
    case = make_case(env.outgoing, ["share"])

    first = env.dispatch(case)
    assert first["location"] == "outgoing"
    second = env.dispatch(case)
    assert second["location"] == "error"
    assert (env.error / case.name).is_dir()

    runs = case_runs(case.name)
    assert len(runs) == 2
    retry, final = (r.state for r in runs)
    assert retry is not None
    assert final is not None
    assert (retry.type, retry.name) == (StateType.FAILED, RETRY_PENDING)
    assert "share" in (retry.message or "")
    assert "\n" not in (retry.message or "")
    assert (final.type, final.name) == (StateType.FAILED, "Failed")
    assert (final.message or "").startswith("moved to error/: Max retries reached")


def test_success_is_completed_and_a_held_case_is_skipped(env: DispatchEnv, tmp_path: Path) -> None:
    env.save_target(FolderTarget(folder=str(tmp_path / "share")), "share")
    held = make_case(env.outgoing, ["share"])
    (held / ".processing").touch()  # mercure's own dispatcher holds it (an empty marker)
    assert env.dispatch(held)["location"] == "skipped"
    assert (held / ".processing").exists()
    assert not list((tmp_path / "share").glob("*"))
    (skip_run,) = case_runs(held.name)
    assert skip_run.state is not None
    assert (skip_run.state.type, skip_run.state.name) == (StateType.CANCELLED, SKIPPED)

    (held / ".processing").unlink()
    assert env.dispatch(held)["location"] == "success"
    done = case_runs(held.name)[-1].state
    assert done is not None
    assert done.type == StateType.COMPLETED
    assert done.name == "Completed"


def test_recovered_claim_sets_its_run_crashed(env: DispatchEnv, tmp_path: Path) -> None:
    """A stale claim naming a run: the claim is released, the run is Crashed, the case sent."""
    from blocks.settings import DispatcherSettings
    from flows.dispatch import dispatch_case
    from flows.sweep import Dispatcher

    env.save_target(FolderTarget(folder=str(tmp_path / "share")), "share")
    case = make_case(env.outgoing, ["share"])

    async def ghost_run() -> FlowRun:
        async with get_client() as client:
            return await client.create_flow_run(
                dispatch_case, parameters={"case": str(case)}, state=Running()
            )

    ghost = asyncio.run(ghost_run())
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    claim = {
        "host": os.uname().nodename,
        "pid": dead.pid,
        "process_started": 1.0,
        "claimed_at": "2026-01-01T00:00:00+00:00",
        "flow_run_id": str(ghost.id),
    }
    (case / ".processing").write_text(json.dumps(claim))

    dispatcher = Dispatcher(DispatcherSettings.load("default"))
    asyncio.run(dispatcher.one_pass())  # releases the claim (and ends the ghost run)
    asyncio.run(dispatcher.one_pass())  # dispatches the case

    assert (env.success / case.name).is_dir()
    state = one_run(ghost.id).state
    assert state is not None
    assert state.type == StateType.CRASHED
    assert "gone" in (state.message or "")
