"""Taking over the cases of a dead host: when may a claim this process does not hold be released?

On this host a dead owner is proven by its pid (``tasks.claims.claim_is_stale``). A claim made
elsewhere (another host, or a work-pool run not started yet) is released only when its owner is
provably dead, which takes two independent signs:

* its flow run has ended (Crashed by the zombie-run automation when heartbeats stopped, or any
  other final state: a finished run owns nothing), and
* the claim's own heartbeat, which a live owner rewrites every ``CLAIM_HEARTBEAT_SECONDS``
  without needing the API, is older than the takeover window.

The release itself is atomic (``tasks.claims.release_dead_claim``): of several processes or hosts
that judged one claim dead, only the first to take it aside finds the owner it judged; the others
find the new claim and put it back untouched.

So an owner cut off from the Prefect API (its run set Crashed meanwhile) keeps its cases, and an
owner whose run the API still shows Running keeps them too. A queued claim has no process yet:
its run's end alone frees it. A claim with a heartbeat but no run (its owner died between claim
and run) is freed by the heartbeat alone; an old-format claim without either is left alone.

Worst case from a host's death to its case being claimed again: the window (both signs run
concurrently; the zombie trigger adds its evaluation delay of a few seconds) plus one check
interval (``CLAIM_HEARTBEAT_SECONDS``) plus one scan. Hosts' clocks must agree (NTP): a skew
shortens or lengthens the window by as much.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path
from uuid import UUID

from prefect.client.orchestration import PrefectClient, get_client

from blocks.host import claim_heartbeat_seconds
from tasks.claims import (
    CLAIM_HEARTBEAT_SECONDS,
    ClaimOwner,
    claim_age,
    read_claim,
    release_dead_claim,
)

__all__ = ["ForeignClaims"]

LOGGER = logging.getLogger(__name__)


class ForeignClaims:
    """Judges, at most every ``interval`` seconds (default: the claim heartbeat's), the claims
    that other processes hold."""

    def __init__(
        self,
        interval: float | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if interval is None:
            interval = claim_heartbeat_seconds(CLAIM_HEARTBEAT_SECONDS)
        self.interval = interval
        self._clock = clock
        self._last_check = float("-inf")

    async def release_dead(self, claimed: list[Path], window: float) -> list[str]:
        """Release the claims whose owners are provably dead; the case ids released."""
        if self._clock() - self._last_check < self.interval:
            return []
        self._last_check = self._clock()
        suspects: list[tuple[Path, ClaimOwner]] = []
        for path in claimed:
            owner = read_claim(path)
            if owner is None or owner.is_this_process():
                continue
            if owner.queued or claim_age(path, owner) >= window:
                suspects.append((path, owner))
        if not suspects:
            return []
        released: list[str] = []
        async with get_client() as client:
            for path, owner in suspects:
                why = await self._proof_of_death(client, path, owner)
                # Atomic: released only if the claim taken aside is still the one judged dead
                # (a sibling that got there first has claimed it anew: that claim is put back).
                if why and release_dead_claim(path, owner):
                    released.append(path.name)
                    LOGGER.warning(
                        "case %s: released the claim of %s:%s: %s",
                        path.name,
                        owner.host,
                        owner.pid,
                        why,
                    )
        return released

    @staticmethod
    async def _proof_of_death(client: PrefectClient, path: Path, owner: ClaimOwner) -> str | None:
        if owner.flow_run_id is None:
            if owner.heartbeat is None:
                return None  # an old claim without run or heartbeat: its owner cannot be judged
            return "no refresh within the takeover window and no flow run"
        try:
            run = await client.read_flow_run(UUID(owner.flow_run_id))
        except Exception as exc:  # unknown run or API down: leave the claim alone
            LOGGER.debug("claim of %s: run %s unreadable: %s", path.name, owner.flow_run_id, exc)
            return None
        if run.state is None or not run.state.is_final():
            return None
        return f"its run {run.id} is {run.state.type.value}" + (
            "" if owner.queued else " and the claim had no refresh within the takeover window"
        )
