"""tasks/claims.py: claims change hands atomically, and the marker is read safely.

A dead claim is released by rename and re-read, never by check-then-unlink; a live claim taken
aside is put back with link(); an owner knows its claim by inode (the heartbeat and the
pre-send check); a ``.processing`` that is a link, a FIFO or too large is a foreign claim.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from tasks import claims
from tasks.claims import (
    MAX_CLAIM_BYTES,
    PROCESSING,
    ClaimLost,
    ClaimOwner,
    claim_case,
    claim_is_stale,
    ensure_claim_held,
    holds_claim,
    read_claim,
    refresh_held_claims,
    release_dead_claim,
    release_own_claim,
    release_stale_claim,
)

from .claim_racers import race

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True)
def no_claims_held(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each test starts holding nothing (the held claims are the process's)."""
    monkeypatch.setattr(claims, "_held", {})


@pytest.fixture
def dead_claim(make_case) -> Path:
    """A case claimed on this host by a process that is gone."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    case = make_case()
    dead = dataclasses.replace(
        ClaimOwner.me(), pid=proc.pid, process_started=time.time() - 5, heartbeat=1.0
    )
    (case / PROCESSING).write_text(json.dumps(dataclasses.asdict(dead)))
    assert claim_is_stale(case)
    return case


def leftovers(outgoing: Path) -> list[str]:
    """Temporary names of ours left behind in the outgoing folder."""
    return sorted(p.name for p in outgoing.iterdir() if not p.is_dir())


def retire(case: Path, content: bytes | None = None) -> None:
    """Another process's claim replaces ours: a new file (new inode), as a takeover makes."""
    data = (case / PROCESSING).read_bytes() if content is None else content
    os.rename(case / PROCESSING, case.parent / "old-claim")
    (case / PROCESSING).write_bytes(data)
    (case.parent / "old-claim").unlink()


# --------------------------------------------------------------------------------------------
# three racers, one stale claim


@pytest.mark.timeout(180)  # three spawned interpreters on a loaded machine
@pytest.mark.parametrize("scenario", ["sequential", "interleaved"])
def test_three_racers_taking_over_one_stale_claim_send_it_once(
    dead_claim: Path, tmp_path: Path, scenario: str
) -> None:
    sent = tmp_path / "sent"
    sent.mkdir()

    did = race(dead_claim, scenario, sent)

    senders = sorted(p.name for p in sent.iterdir())
    assert len(senders) == 1, f"{scenario}: sent by {senders}; {did}"
    assert [r for r, d in did.items() if d["sent"]] == senders
    assert sum(d["released"] for d in did.values()) == 1, "one racer released the dead claim"
    assert did["first"]["released"]
    assert did["first"]["claimed"]
    assert not did["second"]["released"], "second found first's live claim, not the dead one"
    winner = "first" if scenario == "sequential" else "third"
    assert senders == [winner]
    holder = read_claim(dead_claim)
    assert holder is not None
    assert holder.heartbeat != 1.0, "the case is claimed anew"
    assert leftovers(dead_claim.parent) == []


# --------------------------------------------------------------------------------------------
# a live claim taken aside goes back, and never over another


def test_a_live_claim_taken_aside_is_put_back_by_link(dead_claim: Path) -> None:
    judged = read_claim(dead_claim)
    assert judged is not None
    (dead_claim / PROCESSING).unlink()  # a sibling released it and claimed the case
    assert claim_case(dead_claim)
    live = os.lstat(dead_claim / PROCESSING)

    assert release_dead_claim(dead_claim, judged) is False

    back = os.lstat(dead_claim / PROCESSING)
    assert (back.st_dev, back.st_ino) == (live.st_dev, live.st_ino), "the same file, linked back"
    assert back.st_nlink == 1
    assert holds_claim(dead_claim), "its owner still holds the case"
    assert leftovers(dead_claim.parent) == []


def test_a_claim_made_while_another_is_aside_is_never_overwritten(
    dead_claim: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    judged = read_claim(dead_claim)
    assert judged is not None
    (dead_claim / PROCESSING).unlink()
    assert claim_case(dead_claim)  # the live claim that will be taken aside
    newcomer = b'{"host": "elsewhere", "pid": 7, "process_started": 1.0, "claimed_at": "x"}'
    grab = claims._grab

    def grab_then_someone_claims(case_dir: Path) -> Path | None:
        aside = grab(case_dir)
        (case_dir / PROCESSING).write_bytes(newcomer)  # an O_EXCL claim in the gap
        return aside

    monkeypatch.setattr(claims, "_grab", grab_then_someone_claims)

    assert release_dead_claim(dead_claim, judged) is False

    assert (dead_claim / PROCESSING).read_bytes() == newcomer, "the newcomer's claim stands"
    assert not holds_claim(dead_claim), "the displaced owner no longer holds the case"
    assert leftovers(dead_claim.parent) == []


def test_only_the_owner_that_was_judged_is_released(dead_claim: Path) -> None:
    judged = read_claim(dead_claim)
    assert judged is not None

    assert release_dead_claim(dead_claim, judged) is True

    assert not (dead_claim / PROCESSING).exists()
    assert release_dead_claim(dead_claim, judged) is False, "nothing left to release"
    assert claim_case(dead_claim), "then claimed normally"


# --------------------------------------------------------------------------------------------
# the owner: heartbeat and pre-send check by inode


def test_the_heartbeat_never_overwrites_a_claim_taken_over_meanwhile(
    make_case, monkeypatch: pytest.MonkeyPatch
) -> None:
    case = make_case()
    assert claim_case(case)
    theirs = json.dumps({**json.loads((case / PROCESSING).read_text()), "pid": 1}).encode()
    open_new = claims.open_new

    def taken_over_during_the_refresh(path: Path) -> Any:
        retire(case, theirs)  # between the heartbeat's read and its replace
        return open_new(path)

    monkeypatch.setattr(claims, "open_new", taken_over_during_the_refresh)

    assert refresh_held_claims() == 0

    assert (case / PROCESSING).read_bytes() == theirs, "the new owner's claim is untouched"
    assert not holds_claim(case)
    assert leftovers(case.parent) == []


def test_the_heartbeat_follows_its_own_rewrites(make_case) -> None:
    case = make_case()
    assert claim_case(case)
    first = os.lstat(case / PROCESSING).st_ino

    assert refresh_held_claims() == 1
    assert os.lstat(case / PROCESSING).st_ino != first, "a refresh writes a new file"
    assert holds_claim(case), "which the owner knows as its own"
    assert refresh_held_claims() == 1
    ensure_claim_held(case)


def test_a_claim_replaced_by_an_identical_one_stops_the_send(make_case) -> None:
    case = make_case()
    assert claim_case(case)
    ensure_claim_held(case)

    retire(case)  # same bytes, another file: someone else's claim

    with pytest.raises(ClaimLost):
        ensure_claim_held(case)
    assert refresh_held_claims() == 0, "nor is it refreshed"
    assert release_own_claim(case) is False, "nor released by the former owner"
    assert (case / PROCESSING).exists()


def test_release_own_claim_frees_only_our_claim(make_case) -> None:
    case = make_case()
    assert claim_case(case)

    assert release_own_claim(case) is True

    assert not (case / PROCESSING).exists()
    with pytest.raises(ClaimLost):
        ensure_claim_held(case)


# --------------------------------------------------------------------------------------------
# reading the marker safely


def _read_in_thread(case: Path, timeout: float) -> tuple[bool, Any]:
    result: list[Any] = []
    reader = threading.Thread(target=lambda: result.append(read_claim(case)), daemon=True)
    reader.start()
    reader.join(timeout)
    return reader.is_alive(), result


def test_a_fifo_claim_is_read_at_once_as_foreign(make_case, caplog) -> None:
    case = make_case()
    fifo = case / PROCESSING
    os.mkfifo(fifo)
    blocked = True
    try:
        with caplog.at_level(logging.WARNING, logger=claims.__name__):
            blocked, result = _read_in_thread(case, 5.0)
            assert not blocked, "reading the claim blocked on a FIFO"
            assert result == [None]
            assert read_claim(case) is None
    finally:
        if blocked:  # release the reader of the code under test
            os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
    assert not claim_is_stale(case)
    assert release_stale_claim(case) is None
    assert fifo.exists(), "a foreign claim is never released"
    assert len([r for r in caplog.records if r.levelno == logging.WARNING]) == 1, "logged once"


def test_a_claim_linked_to_dev_zero_is_not_read(make_case) -> None:
    """In a child with 512 MiB of address space: reading /dev/zero whole would fail there."""
    case = make_case()
    (case / PROCESSING).symlink_to("/dev/zero")
    code = (
        "import resource, sys; from pathlib import Path\n"
        "resource.setrlimit(resource.RLIMIT_AS, (512 << 20, 512 << 20))\n"
        "from tasks.claims import read_claim, claim_is_stale\n"
        "print(read_claim(Path(sys.argv[1])), claim_is_stale(Path(sys.argv[1])))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code, str(case)],
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=60,
    )

    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split() == ["None", "False"]
    assert (case / PROCESSING).is_symlink(), "left where it is"


def test_a_claim_linked_to_a_dead_claim_is_foreign(dead_claim: Path, tmp_path: Path) -> None:
    elsewhere = tmp_path / "claim.json"
    shutil.move(dead_claim / PROCESSING, elsewhere)
    (dead_claim / PROCESSING).symlink_to(elsewhere)

    assert read_claim(dead_claim) is None
    assert release_stale_claim(dead_claim) is None
    assert (dead_claim / PROCESSING).is_symlink()


def test_a_claim_over_64_kib_is_refused(dead_claim: Path) -> None:
    text = (dead_claim / PROCESSING).read_text()
    (dead_claim / PROCESSING).write_text(text + " " * (MAX_CLAIM_BYTES + 1 - len(text)))

    assert read_claim(dead_claim) is None
    assert not claim_is_stale(dead_claim), "a foreign claim is never stale"
    assert release_stale_claim(dead_claim) is None
    assert (dead_claim / PROCESSING).stat().st_size == MAX_CLAIM_BYTES + 1


def test_a_claim_of_64_kib_is_read(dead_claim: Path) -> None:
    text = (dead_claim / PROCESSING).read_text()
    (dead_claim / PROCESSING).write_text(text + " " * (MAX_CLAIM_BYTES - len(text)))

    assert read_claim(dead_claim) is not None
    assert release_stale_claim(dead_claim) is not None
