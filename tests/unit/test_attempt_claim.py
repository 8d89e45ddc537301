"""tasks/attempt_claim.py: the claim an attempt holds is released once, whatever ends it.

Real case folders and real ``.processing`` markers; a takeover is simulated as it happens on
disk (the marker replaced by another owner's file).
"""

from __future__ import annotations

import asyncio
import json
import os
from pathlib import Path
from typing import Any

import pytest

from tasks.attempt_claim import AttemptClaim
from tasks.claims import PROCESSING, ClaimLost, claim_case, holds_claim, read_claim


def take(case: Path) -> AttemptClaim:
    claim = AttemptClaim.take(case)
    assert claim is not None
    return claim


def taken_over(case: Path) -> bytes:
    """Another host's claim in place of ours (a new file: another inode)."""
    other = {"host": "elsewhere", "pid": 1, "process_started": 0.0, "claimed_at": "now"}
    data = json.dumps(other).encode()
    tmp = case.parent / "other-claim"
    tmp.write_bytes(data)
    os.replace(tmp, case / PROCESSING)
    return data


@pytest.mark.parametrize(
    "error",
    [RuntimeError("boom"), OSError(28, "full"), asyncio.CancelledError(), KeyboardInterrupt()],
)
def test_released_whatever_breaks(make_case: Any, error: BaseException) -> None:
    case = make_case()

    def attempt() -> None:
        with take(case):
            assert holds_claim(case)
            raise error

    with pytest.raises(type(error)):
        attempt()
    assert not (case / PROCESSING).exists()
    assert AttemptClaim.take(case) is not None  # free for the next attempt


def test_a_claim_taken_over_is_left_to_its_new_owner(make_case: Any) -> None:
    case = make_case()
    theirs = b""

    def attempt() -> None:
        nonlocal theirs
        with take(case) as claim:
            theirs = taken_over(case)
            claim.ensure_held()

    with pytest.raises(ClaimLost):
        attempt()
    assert (case / PROCESSING).read_bytes() == theirs


def test_taken_only_once(make_case: Any) -> None:
    case = make_case()
    with take(case):
        assert AttemptClaim.take(case) is None


def test_released_exactly_once_even_when_released_early(make_case: Any) -> None:
    """A retry recorded frees the claim at once; the block's end must not free the claim the
    next attempt of this same process has made meanwhile."""
    case = make_case()
    with take(case) as claim:
        assert claim.release()
        assert not (case / PROCESSING).exists()
        assert claim_case(case)  # the next attempt, in this process
    assert holds_claim(case)


def test_a_nested_attempt_borrows_and_only_the_outer_one_releases(make_case: Any) -> None:
    case = make_case()
    with take(case):
        inner = AttemptClaim.adopt(case, "run-1")
        assert inner is not None
        assert inner.borrowed
        with inner:
            pass
        assert holds_claim(case)  # the inner block's end freed nothing
        owner = read_claim(case)
        assert owner is not None
        assert owner.flow_run_id == "run-1"
    assert not (case / PROCESSING).exists()


def test_a_nested_release_frees_the_claim_once_for_both(make_case: Any) -> None:
    case = make_case()
    with take(case):
        with AttemptClaim.of(case) as inner:
            inner.release()
        assert not (case / PROCESSING).exists()
        assert claim_case(case)
    assert holds_claim(case)


def test_a_moved_case_carries_no_claim(make_case: Any, tmp_path: Path) -> None:
    case = make_case()
    with take(case) as claim:
        dest = claim.move(tmp_path / "success")
        case.mkdir()  # a new case of the same name, claimed by this process
        assert claim_case(case)
    assert dest.is_dir()
    assert not (dest / PROCESSING).exists()
    assert holds_claim(case)


def test_a_case_taken_over_is_not_moved(make_case: Any, tmp_path: Path) -> None:
    case = make_case()

    def attempt() -> None:
        with take(case) as claim:
            taken_over(case)
            claim.move(tmp_path / "success")

    with pytest.raises(ClaimLost):
        attempt()
    assert case.is_dir()
    assert not (tmp_path / "success").exists()


def test_a_hand_over_queues_the_claim_for_the_run_and_keeps_it(make_case: Any) -> None:
    case = make_case()
    with take(case) as claim:
        assert claim.hand_over("run-7")
    owner = read_claim(case)
    assert owner is not None
    assert owner.queued
    assert owner.flow_run_id == "run-7"
    assert not holds_claim(case)  # no longer this process's: not refreshed, not released
    adopted = AttemptClaim.adopt(case, "run-7")  # the worker's run
    assert adopted is not None
    with adopted:
        assert holds_claim(case)
    assert not (case / PROCESSING).exists()


def test_someone_elses_claim_is_not_adopted(make_case: Any) -> None:
    case = make_case()
    taken_over(case)
    assert AttemptClaim.adopt(case, "run-1") is None
    assert AttemptClaim.take(case) is None
