"""Claims change hands atomically, end to end: an attempt whose claim was taken over sends
nothing more, and dispatchers racing on stale claims deliver each case once.

Real Prefect runs and a real Storage SCP that counts SOP Instance UIDs from its side.
"""

from __future__ import annotations

import asyncio
import contextvars
import dataclasses
import json
import socket
import threading
import time
from pathlib import Path
from typing import Any

from prefect.client.orchestration import get_client
from prefect.states import Crashed, Running

from blocks.dicom import DicomTarget
from tasks.claims import PROCESSING, read_claim
from tasks.safefiles import create_new
from tests.cases import make_case
from tests.dispatch_env import DispatchEnv
from tests.peers.counting_scp import counting_scp
from tests.service import free_port

#: A takeover window the settings allow (45–150 s); the judge is given claims older or younger.
TAKEOVER_WINDOW = 45


def test_a_send_after_the_claim_was_taken_over_never_happens(
    env: DispatchEnv, tmp_path: Path
) -> None:
    """The peer hangs up at first, so the send waits for its quick retry; meanwhile another host
    takes the claim over and the peer comes up. The retry must not send: the claim is no longer
    this attempt's. The case stays in outgoing/ under the new owner's claim, its task.json
    untouched by the old attempt."""
    port = free_port()
    env.save_settings(quick_retry_delays=[4.0, 4.0])
    pacs = DicomTarget(ip="127.0.0.1", port=str(port), aet_target="COUNTER", backend="pynetdicom")
    env.save_target(pacs, "pacs")
    case = make_case(env.outgoing, ["pacs"], files=2)
    result: dict[str, Any] = {}
    # The attempt's thread runs in this test's context: Prefect's settings (the session server)
    # live in a context variable, and a bare thread would get Prefect's import-time settings.
    context = contextvars.copy_context()
    attempt = threading.Thread(
        target=context.run, args=(lambda: result.update(env.dispatch(case)),), daemon=True
    )
    # The peer's port answers and hangs up at once: the first send fails there, and from then on
    # the attempt waits for its quick retry (the takeover below must not race the first send).
    with socket.create_server(("127.0.0.1", port)) as hang_up:
        hang_up.settimeout(60)
        attempt.start()
        first_try, _ = hang_up.accept()
        first_try.close()
    mine = read_claim(case)
    assert mine is not None
    # The takeover: the claim taken aside, the case claimed anew by another host.
    theirs = dataclasses.replace(mine, host="host-b", pid=4242, flow_run_id=None)
    (case / PROCESSING).rename(tmp_path / "taken-aside")
    create_new(case / PROCESSING, json.dumps(dataclasses.asdict(theirs)).encode())

    with counting_scp(port=port) as scp:
        attempt.join(120)
        assert not attempt.is_alive(), "the attempt ended"

    assert scp.uids == [], "nothing was sent once the claim was someone else's"
    assert result["location"] == "skipped", result
    assert read_claim(case) == theirs, "the new owner's claim is left as it is"
    assert case.is_dir()
    assert not (env.success / case.name).exists()
    status = env.task(case)["dispatch"]["status"].get("pacs", {})
    assert status.get("state") not in ("error", "complete"), status
    assert env.task(case)["dispatch"].get("retries") in (None, 0), "no attempt counted"


def test_a_live_owner_cut_off_from_the_api_keeps_its_claim(env: DispatchEnv) -> None:
    """Its run shows Crashed, but its claim's heartbeat is fresh: nobody takes the case."""
    from flows.dispatch import dispatch_case
    from flows.takeover import ForeignClaims

    case = make_case(env.outgoing, ["nowhere"])

    async def run_in(state: Any) -> str:
        async with get_client() as client:
            run = await client.create_flow_run(dispatch_case, parameters={"case": str(case)})
            await client.set_flow_run_state(run.id, state, force=True)
            return str(run.id)

    def claim(run_id: str, age: float) -> None:
        owner = {
            "host": "elsewhere",
            "pid": 4242,
            "process_started": 1.0,
            "claimed_at": "2026-01-01T00:00:00+00:00",
            "flow_run_id": run_id,
            "heartbeat": time.time() - age,
        }
        (case / PROCESSING).write_text(json.dumps(owner))

    def judge() -> list[str]:
        return asyncio.run(ForeignClaims().release_dead([case], TAKEOVER_WINDOW))

    crashed = asyncio.run(run_in(Crashed(message="no heartbeat")))
    claim(crashed, age=5)
    assert judge() == [], "fresh heartbeat: alive"
    assert (case / PROCESSING).exists()
    running = asyncio.run(run_in(Running()))
    claim(running, age=TAKEOVER_WINDOW + 10)
    assert judge() == [], "its run is not over"
    assert (case / PROCESSING).exists()
    claim(crashed, age=TAKEOVER_WINDOW + 10)
    assert judge() == [case.name], "provably dead"
    assert not (case / PROCESSING).exists()
