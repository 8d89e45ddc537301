"""The claim an attempt holds on a case: taken (or adopted), kept alive, released exactly once.

``with AttemptClaim.take(case_dir) as claim:`` is the one place a claim this process holds is
freed: whatever ends the block (success, a retry, an outage, a stop, an unexpected error,
``ClaimLost``), the claim is released on the way out, once, and only if the marker is still the
file this process wrote (``release_own_claim``: a claim taken over meanwhile is left to its new
owner). While it is held, the heartbeat of ``tasks/claims.py`` keeps it fresh. Leaving the
process's hands otherwise goes through it too: :meth:`AttemptClaim.move` (the moved case
carries no claim) and :meth:`AttemptClaim.hand_over` (the work-pool sweep queues the claim for a
flow run a worker will start).

One attempt may be nested in another of the same process (the loop's ``run_case`` around the
flow run ``dispatch_case``): the inner one *borrows* the claim, and only the outermost releases
it when its block ends (or earlier, by :meth:`AttemptClaim.release`, e.g. once a retry is
recorded).

No Prefect here: the folder protocol and claims below, ``flows/dispatch.py`` above.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path
from types import TracebackType

from tasks import casefolder as cf
from tasks.claims import (
    claim_case,
    ensure_claim_held,
    holds_claim,
    queue_claim,
    read_claim,
    record_claim_run,
    release_own_claim,
)

__all__ = ["AttemptClaim"]

_lock = threading.Lock()
#: The claim owning each case folder's attempt in this process, while its block runs.
_active: dict[Path, AttemptClaim] = {}


def _key(case_dir: Path) -> Path:
    return Path(os.path.abspath(case_dir))


class AttemptClaim:
    """This process's claim on one case for one attempt (a context manager)."""

    def __init__(self, case_dir: Path, *, owner: AttemptClaim | None = None) -> None:
        self.case_dir = case_dir
        #: The claim that releases (self, unless borrowed from an enclosing attempt).
        self._owner = owner or self
        self._open = True

    # -- getting one -------------------------------------------------------------------------

    @classmethod
    def take(cls, case_dir: Path, flow_run_id: str | None = None) -> AttemptClaim | None:
        """Claim the case (``O_EXCL``); None if someone holds it. ``OSError`` as
        ``claim_case`` (a folder the service may not write)."""
        return cls(case_dir) if claim_case(case_dir, flow_run_id) else None

    @classmethod
    def adopt(cls, case_dir: Path, flow_run_id: str | None) -> AttemptClaim | None:
        """The claim this process already holds on the case, or one queued for ``flow_run_id``
        (the run records itself in it); None if the case is someone else's or unclaimed."""
        found = read_claim(case_dir)
        if found is None or not (found.is_this_process() or found.is_queued_for(flow_run_id)):
            return None
        if flow_run_id:
            record_claim_run(case_dir, flow_run_id)
        return cls.of(case_dir)

    @classmethod
    def of(cls, case_dir: Path) -> AttemptClaim:
        """The attempt's claim on ``case_dir``: borrowed from the enclosing attempt of this
        process, or a new one (for a claim this process made without a block around it)."""
        with _lock:
            enclosing = _active.get(_key(case_dir))
        return cls(case_dir, owner=enclosing) if enclosing is not None else cls(case_dir)

    # -- the block ---------------------------------------------------------------------------

    @property
    def borrowed(self) -> bool:
        return self._owner is not self

    def __enter__(self) -> AttemptClaim:
        if not self.borrowed:
            with _lock:
                _active.setdefault(_key(self.case_dir), self)
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        trace: TracebackType | None,
    ) -> None:
        if not self.borrowed:
            self.release()

    # -- while held --------------------------------------------------------------------------

    def held(self) -> bool:
        """The marker is still the file this process wrote (not taken over, not moved)."""
        return holds_claim(self.case_dir)

    def ensure_held(self) -> None:
        """Raise ``ClaimLost`` unless the case is still ours (before a send, before a move)."""
        ensure_claim_held(self.case_dir)

    # -- leaving this process's hands: the one release site ----------------------------------

    def release(self) -> bool:
        """Free the claim now, if it is still ours; later calls (and the block's end) do
        nothing. True if a marker of ours was removed."""
        owner = self._owner
        with _lock:
            if not owner._open:
                return False
            owner._open = False
            if _active.get(_key(owner.case_dir)) is owner:
                del _active[_key(owner.case_dir)]
        return release_own_claim(owner.case_dir)

    def move(self, dest_root: Path, *, fail_stage: str | None = None, reason: str = "") -> Path:
        """Move the case into ``dest_root`` (``cf.move_case``) if it is still ours; the moved
        case carries no claim, so nothing is left to release. ``ClaimLost`` if it was taken."""
        self.ensure_held()
        dest = cf.move_case(self.case_dir, dest_root, fail_stage=fail_stage, reason=reason or None)
        self.release()  # the marker left with the case (removed there): only forgotten here
        return dest

    def hand_over(self, flow_run_id: str) -> bool:
        """Queue the claim for a flow run a worker will start (``queue_claim``): the run adopts
        it; this process neither refreshes nor releases it any more. True if handed over."""
        handed = queue_claim(self.case_dir, flow_run_id)
        owner = self._owner
        with _lock:
            owner._open = False
            if _active.get(_key(owner.case_dir)) is owner:
                del _active[_key(owner.case_dir)]
        return handed
