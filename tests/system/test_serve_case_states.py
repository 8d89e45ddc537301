"""What the UI shows of cases that ``serve`` handles as a process: a UI retry dispatches the case
again, the zombie-run automation exists, a killed service leaves no run Running."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

from prefect.client.orchestration import get_client
from prefect.client.schemas.objects import StateType
from prefect.states import AwaitingRetry

from flows.case_states import ALREADY_SENT
from tests.cases import make_case
from tests.dispatch_env import DispatchEnv
from tests.integration.test_case_states import blocked_folder, case_runs, one_run
from tests.service import silent_peer, start_serve, stop, wait_for


def test_ui_retry_dispatches_the_case_again(env: DispatchEnv, tmp_path: Path) -> None:
    """The loop's runs belong to dispatch-case; the UI's Retry call sends the case from error/."""
    env.save_settings(retry_max=1)
    target, blocker = blocked_folder(tmp_path)
    env.save_target(target, "share")
    proc, log = start_serve(tmp_path)
    try:
        case = make_case(env.outgoing, ["share"])
        wait_for(lambda: (env.error / case.name).is_dir(), 90, "the case to reach error/")
        wait_for(lambda: bool(case_runs(case.name)), 30, "the case's run")
        (run,) = case_runs(case.name)
        assert run.deployment_id is not None, "a loop run must belong to the deployment"
        wait_for(lambda: _state(run.id).type == StateType.FAILED, 30, "the run to end Failed")

        blocker.unlink()  # the target works now
        _retry_from_ui(run.id)
        wait_for(lambda: _state(run.id).type == StateType.COMPLETED, 120, "the retried run")
        assert (env.success / case.name).is_dir()
        copies = [p for p in (blocker / "share").iterdir() if not p.name.startswith(".")]
        assert len(copies) == 1

        _retry_from_ui(run.id)  # a second Retry: the case is in success/ already
        wait_for(lambda: _state(run.id).name == ALREADY_SENT, 120, "the second retry")
        assert _state(run.id).type == StateType.COMPLETED
        again = [p for p in (blocker / "share").iterdir() if not p.name.startswith(".")]
        assert again == copies, "nothing may be sent twice"
        assert len(case_runs(case.name)) == 1, "a Retry reuses the run"
    finally:
        stop(proc, log)


def test_serve_creates_the_zombie_run_automation(env: DispatchEnv, tmp_path: Path) -> None:
    from deployments.automations import ZOMBIE_AUTOMATION, ZOMBIE_WINDOW_SECONDS

    async def automations() -> list[Any]:
        async with get_client() as client:
            return list(await client.read_automations_by_name(ZOMBIE_AUTOMATION))

    for _ in range(2):  # a second start finds it and creates no second one
        proc, log = start_serve(tmp_path)
        try:
            wait_for(lambda log=log: b"dispatching from" in log.read_bytes(), 120, "serve to start")
        finally:
            stop(proc, log)
    (automation,) = asyncio.run(automations())
    assert automation.enabled
    assert automation.trigger.within.total_seconds() == ZOMBIE_WINDOW_SECONDS
    assert automation.actions[0].type == "change-flow-run-state"


def test_a_killed_service_leaves_no_running_ghost(env: DispatchEnv, tmp_path: Path) -> None:
    """SIGKILL mid-send, never restarted: the automation sets the run Crashed within its window.

    The peer accepts the TCP connection and never answers, so the send is in flight when the
    service dies; nothing on this host will ever report the run's end.
    """
    from blocks.dicom import DicomTarget
    from blocks.host import MIN_ZOMBIE_WINDOW_SECONDS, TEST_TAKEOVER_WINDOW_ENV
    from deployments.automations import ensure_zombie_automation

    with silent_peer() as (port, held):
        env.save_target(DicomTarget(ip="127.0.0.1", port=port, acse_timeout=600), "silent")
        # The shortest zombie window there is (the tests' takeover window raises it to 35 s).
        proc, _ = start_serve(tmp_path, **{TEST_TAKEOVER_WINDOW_ENV: "10"})
        try:
            case = make_case(env.outgoing, ["silent"])
            wait_for(lambda: bool(case_runs(case.name)), 90, "the case's run")
            (run,) = case_runs(case.name)
            wait_for(lambda: _state(run.id).type == StateType.RUNNING, 60, "the run to be running")
            wait_for(lambda: bool(held), 30, "the send to connect")
        finally:
            proc.kill()
            proc.wait(30)
    try:
        wait_for(
            lambda: _state(run.id).type == StateType.CRASHED,
            MIN_ZOMBIE_WINDOW_SECONDS + 60,
            "the zombie-run automation",
        )
    finally:

        async def default_window() -> None:
            async with get_client() as client:
                await ensure_zombie_automation(client)

        asyncio.run(default_window())
    assert "heartbeat" in (_state(run.id).message or "")
    assert (case / ".processing").exists(), "the claim stays until a dispatcher recovers it"


def _state(run_id: Any) -> Any:
    state = one_run(run_id).state
    assert state is not None
    return state


def _retry_from_ui(run_id: Any) -> None:
    """Exactly what the UI's Retry button sends."""

    async def retry() -> None:
        async with get_client() as client:
            await client.set_flow_run_state(run_id, AwaitingRetry(), force=True)

    asyncio.run(retry())
