"""tasks/claims.py, as the case-folder protocol uses it: the .processing marker, who owns it, and
when it is stale."""

from __future__ import annotations

import datetime as dt
import json
import os
import socket
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import psutil
import pytest

from tasks import claims
from tasks.claims import PROCESSING, ClaimOwner

# --------------------------------------------------------------------------------------------
# claims


def test_claim_is_exclusive(make_case):
    case = make_case()

    assert claims.claim_case(case) is True
    assert claims.claim_case(case) is False


def test_claim_records_the_owner(make_case):
    case = make_case()

    claims.claim_case(case, flow_run_id="run-1")

    data = json.loads((case / PROCESSING).read_text())
    assert data["host"] == socket.gethostname()
    assert data["pid"] == os.getpid()
    assert data["process_started"] == pytest.approx(psutil.Process().create_time())
    assert data["flow_run_id"] == "run-1"
    claimed_at = dt.datetime.fromisoformat(data["claimed_at"])
    assert claimed_at.tzinfo is not None
    assert abs((dt.datetime.now().astimezone() - claimed_at).total_seconds()) < 60


def test_second_claim_keeps_the_first_owner(make_case):
    case = make_case()
    claims.claim_case(case, flow_run_id="first")

    claims.claim_case(case, flow_run_id="second")

    assert claims.read_claim(case).flow_run_id == "first"


def test_read_claim_returns_the_owner(make_case):
    case = make_case()
    claims.claim_case(case)

    owner = claims.read_claim(case)

    assert owner == ClaimOwner(**json.loads((case / PROCESSING).read_text()))
    assert owner.is_this_process()


def test_read_claim_of_empty_marker_is_none(make_case):
    # mercure's own dispatcher writes an empty .processing.
    case = make_case()
    (case / PROCESSING).touch()

    assert claims.read_claim(case) is None


@pytest.mark.parametrize("content", ["garbage", "[1, 2]", '{"host": "h"}', '{"who": "else"}'])
def test_read_claim_of_foreign_marker_is_none(make_case, content):
    case = make_case()
    (case / PROCESSING).write_text(content)

    assert claims.read_claim(case) is None


def test_read_claim_without_marker_is_none(make_case):
    assert claims.read_claim(make_case()) is None


def write_claim(case: Path, **fields: Any) -> None:
    owner = {
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "process_started": psutil.Process().create_time(),
        "claimed_at": "2025-03-01T10:00:00+00:00",
        "flow_run_id": None,
        **fields,
    }
    (case / PROCESSING).write_text(json.dumps(owner))


@pytest.fixture
def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()  # reaped: the pid no longer names a process
    return proc.pid


def test_own_live_claim_is_not_stale(make_case):
    case = make_case()
    claims.claim_case(case)

    assert claims.claim_is_stale(case) is False


def test_claim_of_dead_process_on_this_host_is_stale(make_case, dead_pid):
    case = make_case()
    write_claim(case, pid=dead_pid, process_started=time.time() - 1)

    assert claims.claim_is_stale(case) is True


def test_claim_of_reused_pid_is_stale(make_case):
    # The pid is alive but belongs to a process started at another time.
    case = make_case()
    write_claim(case, process_started=psutil.Process().create_time() - 3600)

    assert claims.claim_is_stale(case) is True


def test_claim_from_another_host_is_not_stale(make_case, dead_pid):
    case = make_case()
    write_claim(case, host=socket.gethostname() + "-elsewhere", pid=dead_pid)

    assert claims.claim_is_stale(case) is False


def test_empty_claim_is_not_stale(make_case):
    case = make_case()
    (case / PROCESSING).touch()

    assert claims.claim_is_stale(case) is False


def test_missing_claim_is_not_stale(make_case):
    assert claims.claim_is_stale(make_case()) is False


def test_record_claim_run_adds_the_flow_run(make_case):
    case = make_case()
    claims.claim_case(case)
    before = claims.read_claim(case)

    claims.record_claim_run(case, "run-42")

    after = claims.read_claim(case)
    assert after.flow_run_id == "run-42"
    assert asdict(after) == {**asdict(before), "flow_run_id": "run-42"}
    assert sorted(p.name for p in case.iterdir() if p.name.startswith(PROCESSING)) == [PROCESSING]


def test_record_claim_run_leaves_foreign_claims_alone(make_case):
    case = make_case()
    write_claim(case, host="other-host")
    before = (case / PROCESSING).read_text()

    claims.record_claim_run(case, "run-42")

    assert (case / PROCESSING).read_text() == before


def test_record_claim_run_leaves_empty_marker_empty(make_case):
    case = make_case()
    (case / PROCESSING).touch()

    claims.record_claim_run(case, "run-42")

    assert (case / PROCESSING).read_text() == ""


def test_release_claim(make_case):
    case = make_case()
    claims.claim_case(case)

    claims.release_claim(case)
    claims.release_claim(case)  # idempotent

    assert not (case / PROCESSING).exists()
    assert claims.claim_case(case) is True
