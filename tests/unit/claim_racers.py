"""Dispatcher processes racing to take over one stale claim, in an order the test forces.

Each racer is a real process (its own pid, its own held claims), as sibling dispatchers are:
it judges the claim dead (``release_stale_claim``), waits at the point between judgement and
release until its turn, releases, claims the case normally (``O_EXCL``), and "sends" (writes
its role to ``sent/``) only if the pre-send check of its claim passes. The events force:

* ``sequential``: all three judge first; then first, second, third release in turn;
* ``interleaved``: as above, but while second holds first's live claim aside (between its
  re-read and the put-back), third finds no marker and claims the case.
"""

from __future__ import annotations

import multiprocessing as mp
from multiprocessing.synchronize import Barrier, Event
from pathlib import Path
from typing import Any

ROLES = ("first", "second", "third")
WAIT = 60.0  # seconds any racer waits for its turn before the race counts as broken
EVENTS = ("first_done", "second_grabbed", "second_done", "third_done", "go_send")


def _wait(event: Event, what: str) -> None:
    if not event.wait(WAIT):
        raise TimeoutError(f"no {what} within {WAIT} s")


def racer(
    role: str,
    case: str,
    scenario: str,
    judged: Barrier,
    events: dict[str, Event],
    sent: str,
    report: mp.Queue[dict[str, Any]],
) -> None:
    from tasks import claims

    case_dir = Path(case)
    real_release = claims.release_dead_claim
    real_put_back = claims._put_back

    def release_in_turn(path: Path, owner: claims.ClaimOwner) -> bool:
        judged.wait(WAIT)  # every racer has judged the claim dead
        if role == "second":
            _wait(events["first_done"], "first racer")
        elif role == "third":
            turn = "second_grabbed" if scenario == "interleaved" else "second_done"
            _wait(events[turn], turn)
        return real_release(path, owner)

    def put_back_late(aside: Path, path: Path) -> None:
        if role == "second" and scenario == "interleaved":
            events["second_grabbed"].set()
            _wait(events["third_done"], "third racer")
        real_put_back(aside, path)

    claims.release_dead_claim = release_in_turn  # type: ignore[assignment]
    claims._put_back = put_back_late  # type: ignore[assignment]
    released = claims.release_stale_claim(case_dir) is not None
    claimed = claims.claim_case(case_dir)
    events[f"{role}_done"].set()
    _wait(events["go_send"], "the start of the sends")
    try:
        claims.ensure_claim_held(case_dir)  # the check send_to_target makes before a send
        (Path(sent) / role).write_text(role)
        did_send = True
    except claims.ClaimLost:
        did_send = False
    report.put({"role": role, "released": released, "claimed": claimed, "sent": did_send})


def race(case: Path, scenario: str, sent: Path) -> dict[str, dict[str, Any]]:
    """Run the three racers on ``case``; what each did, by role."""
    ctx = mp.get_context("spawn")  # no inherited locks or threads of the test process
    judged = ctx.Barrier(len(ROLES))
    events = {name: ctx.Event() for name in EVENTS}
    report: mp.Queue[dict[str, Any]] = ctx.Queue()
    procs = [
        ctx.Process(
            target=racer, args=(role, str(case), scenario, judged, events, str(sent), report)
        )
        for role in ROLES
    ]
    for proc in procs:
        proc.start()
    try:
        for role in ROLES:
            _wait(events[f"{role}_done"], f"{role} racer's claim")
        events["go_send"].set()
        results = [report.get(timeout=WAIT) for _ in ROLES]
    finally:
        for proc in procs:
            proc.join(WAIT)
            if proc.is_alive():
                proc.kill()
    return {r["role"]: r for r in results}
