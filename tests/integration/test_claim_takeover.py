"""Claims change hands atomically, end to end: an attempt whose claim was taken over sends
nothing more, and dispatchers racing on stale claims deliver each case once.

Real Prefect runs and a real Storage SCP that counts SOP Instance UIDs from its side.
"""

from __future__ import annotations

import dataclasses
import json
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from blocks.dicom import DicomTarget
from tasks.claims import PROCESSING, read_claim
from tasks.safefiles import create_new
from tests.cases import make_case
from tests.integration.conftest import DispatchEnv
from tests.integration.test_scaleout import start_serve
from tests.integration.test_serve import stop, wait_for
from tests.peers.counting_scp import counting_scp


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_a_send_after_the_claim_was_taken_over_never_happens(
    env: DispatchEnv, tmp_path: Path
) -> None:
    """The peer is down at first, so the send waits for its quick retry; meanwhile another host
    takes the claim over and the peer comes up. The retry must not send: the claim is no longer
    this attempt's. The case stays in outgoing/ under the new owner's claim, its task.json
    untouched by the old attempt."""
    port = free_port()
    env.save_settings(quick_retry_delays=[4.0, 4.0])
    pacs = DicomTarget(ip="127.0.0.1", port=str(port), aet_target="COUNTER", backend="pynetdicom")
    env.save_target(pacs, "pacs")
    case = make_case(env.outgoing, ["pacs"], files=2)
    result: dict[str, Any] = {}
    attempt = threading.Thread(target=lambda: result.update(env.dispatch(case)), daemon=True)
    attempt.start()
    wait_for(lambda: read_claim(case) is not None, 60, "the attempt's claim")
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


@pytest.mark.timeout(600)  # two real services on a loaded machine
def test_dispatchers_racing_on_stale_claims_deliver_each_case_once(
    env: DispatchEnv, tmp_path: Path
) -> None:
    """Two dispatchers of one host (one host id) start on cases whose claims were left by a
    process that is gone: both judge every claim stale and race to release it. The receiver
    gets every SOP Instance UID exactly once."""
    cases, files = 20, 2
    host = "host-shared"
    with counting_scp() as scp:
        pacs = DicomTarget(ip="127.0.0.1", port=str(scp.port), aet_target=scp.aet)
        env.save_target(pacs, "pacs")
        gone = subprocess.Popen([sys.executable, "-c", "pass"])
        gone.wait()
        staging = tmp_path / "staging"  # same file system: the cases arrive by rename
        for _ in range(cases):
            case = make_case(staging, ["pacs"], files=files)
            claim = {
                "host": host,
                "pid": gone.pid,
                "process_started": time.time() - 60,
                "claimed_at": "2026-01-01T00:00:00+00:00",
                "flow_run_id": None,
                "heartbeat": time.time() - 60,
            }
            (case / PROCESSING).write_text(json.dumps(claim))
        procs = {
            name: start_serve(tmp_path, name, "--workers", "1", DICOM_DISPATCH_HOST_ID=host)
            for name in ("one", "two")
        }
        try:
            for _, log in procs.values():
                wait_for(lambda log=log: b"dispatching from" in log.read_bytes(), 120, "serve")
            for case in staging.iterdir():  # both are up: both find every stale claim
                case.rename(env.outgoing / case.name)

            def all_sent() -> bool:
                return len(list(env.success.iterdir())) == cases

            wait_for(all_sent, 400, "every case in success/")
        finally:
            for proc, log in procs.values():
                stop(proc, log)
    assert len(scp.uids) == cases * files, "each instance received exactly once"
    assert len(set(scp.uids)) == cases * files
    assert not [p.name for p in env.outgoing.iterdir()], "nothing left behind in outgoing/"
