"""tasks/claims.py: the claim's heartbeat, queued claims, the host id; serve's default workers."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from deployments.service.dispatchers import available_cpus
from tasks.claims import (
    PROCESSING,
    claim_age,
    claim_case,
    claim_is_stale,
    queue_claim,
    read_claim,
    record_claim_run,
    refresh_held_claims,
    release_claim,
)


def test_a_held_claim_is_refreshed_atomically(make_case):
    case = make_case()
    claim_case(case, "run-1")
    before = read_claim(case)

    assert refresh_held_claims(now=before.heartbeat + 15) >= 1

    after = read_claim(case)
    assert after.heartbeat == before.heartbeat + 15
    assert after.flow_run_id == "run-1"
    assert after.claimed_at == before.claimed_at
    assert not [p for p in case.parent.iterdir() if p.name.endswith(".tmp")]


def test_a_released_or_moved_claim_is_not_brought_back(make_case, tmp_path):
    released, moved = make_case("released"), make_case("moved")
    claim_case(released)
    claim_case(moved)
    release_claim(released)
    os.rename(moved, tmp_path / "moved-away")

    refresh_held_claims()

    assert not (released / PROCESSING).exists()
    assert not moved.exists()
    assert not [p for p in (tmp_path / "moved-away").iterdir() if p.name.endswith(".tmp")]


def test_someone_elses_claim_is_never_refreshed(make_case):
    case = make_case()
    claim_case(case)
    other = {**json.loads((case / PROCESSING).read_text()), "pid": 1, "heartbeat": 1.0}
    (case / PROCESSING).write_text(json.dumps(other))

    refresh_held_claims()

    assert read_claim(case).heartbeat == 1.0


def test_a_queued_claim_is_adopted_by_its_run_only(make_case):
    case = make_case()
    claim_case(case)
    assert queue_claim(case, "run-7")
    queued = read_claim(case)
    assert queued.queued
    assert not queued.is_this_process(), "no process owns a queued claim"
    assert not claim_is_stale(case), "a queued claim is judged by its run, not a pid"

    record_claim_run(case, "run-8")
    assert read_claim(case) == queued, "another run cannot adopt it"

    record_claim_run(case, "run-7")
    adopted = read_claim(case)
    assert adopted.is_this_process()
    assert adopted.flow_run_id == "run-7"
    assert adopted.claimed_at == queued.claimed_at


def test_unknown_keys_of_a_later_release_are_ignored(make_case):
    case = make_case()
    claim_case(case)
    data = {**json.loads((case / PROCESSING).read_text()), "lease": "future"}
    (case / PROCESSING).write_text(json.dumps(data))

    assert read_claim(case).is_this_process()


def test_claim_age_uses_the_heartbeat_or_the_file_time(make_case):
    case = make_case()
    claim_case(case)
    owner = read_claim(case)
    assert claim_age(case, owner, now=owner.heartbeat + 40) == pytest.approx(40)

    old = {k: v for k, v in json.loads((case / PROCESSING).read_text()).items() if k != "heartbeat"}
    (case / PROCESSING).write_text(json.dumps(old))
    os.utime(case / PROCESSING, (1000.0, 1000.0))
    assert claim_age(case, read_claim(case), now=1100.0) == pytest.approx(100)


def test_the_host_id_overrides_the_host_name(make_case, monkeypatch):
    case = make_case()
    monkeypatch.setenv("DICOM_DISPATCH_HOST_ID", "host-a")
    claim_case(case)
    assert read_claim(case).host == "host-a"

    monkeypatch.setenv("DICOM_DISPATCH_HOST_ID", "host-b")
    assert not read_claim(case).is_this_process(), "another host id is another host"
    assert not claim_is_stale(case), "another host's pid means nothing here"


@pytest.mark.parametrize(("cpu_max", "cap"), [("max 100000", None), ("150000 100000", 2)])
def test_available_cpus_honours_the_cgroup_quota(tmp_path: Path, cpu_max, cap):
    cgroup = tmp_path / "cpu.max"
    cgroup.write_text(cpu_max + "\n")
    affinity = len(os.sched_getaffinity(0))

    assert available_cpus(cgroup) == (affinity if cap is None else min(affinity, cap))
