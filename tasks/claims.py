"""The claim marker ``.processing``: who holds a case, and the heartbeat that says they still do.

A claim is created exclusively (``O_EXCL``: the one thing that keeps two dispatchers, on one host
or several, from sending the same case) and holds its owner as JSON: host (``blocks.host.host_id``),
pid, the process's start time, when it was claimed, the flow run, and a ``heartbeat``. While a
process holds claims, a daemon thread rewrites each of them every ``CLAIM_HEARTBEAT_SECONDS``
(atomically: temp file + rename). The refresh needs no Prefect API, so an owner cut off from the
API still shows it is alive, and another host may take a case over only when the claim's
heartbeat is older than the takeover window AND its flow run has ended (``flows/takeover.py``).

A claim may also be *queued*: the work-pool sweep claims a case for a flow run that a worker has
not started yet (no process owns it); the run adopts the claim when it starts.

No Prefect here: the folder protocol imports it.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import logging
import os
import secrets
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import psutil

from blocks.host import host_id
from tasks.safefiles import create_new, open_new

__all__ = [
    "CLAIM_HEARTBEAT_SECONDS",
    "PROCESSING",
    "ClaimOwner",
    "claim_age",
    "claim_case",
    "claim_is_stale",
    "queue_claim",
    "read_claim",
    "record_claim_run",
    "refresh_held_claims",
    "release_claim",
]

LOGGER = logging.getLogger(__name__)

PROCESSING = ".processing"
#: How often a holder rewrites its claims; a third of the shortest takeover window allowed.
CLAIM_HEARTBEAT_SECONDS = 15.0


@dataclass(frozen=True)
class ClaimOwner:
    """Who holds a ``.processing`` marker. mercure's own dispatcher leaves it empty."""

    host: str
    pid: int
    process_started: float
    claimed_at: str
    flow_run_id: str | None = None
    #: Unix time of the holder's last refresh (None in claims of earlier releases).
    heartbeat: float | None = None
    #: Held for ``flow_run_id`` until a worker starts that run (the work-pool sweep's claims).
    queued: bool = False

    @classmethod
    def me(cls, flow_run_id: str | None = None) -> ClaimOwner:
        return cls(
            host=host_id(),
            pid=os.getpid(),
            process_started=_process_started(os.getpid()) or 0.0,
            claimed_at=dt.datetime.now().astimezone().isoformat(),
            flow_run_id=flow_run_id,
            heartbeat=time.time(),
        )

    def is_this_process(self) -> bool:
        return not self.queued and self.host == host_id() and self.pid == os.getpid()

    def is_queued_for(self, flow_run_id: str | None) -> bool:
        return self.queued and flow_run_id is not None and self.flow_run_id == flow_run_id


_FIELDS = {f.name for f in dataclasses.fields(ClaimOwner)}


def _process_started(pid: int) -> float | None:
    try:
        return float(psutil.Process(pid).create_time())
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return None


def claim_case(case_dir: Path, flow_run_id: str | None = None) -> bool:
    """Create ``.processing`` exclusively; False when someone else holds the case."""
    try:
        # Exclusive and never through a link; on a full disk the half-made marker is removed
        # (an empty one would read as mercure's claim and hold the case forever).
        create_new(case_dir / PROCESSING, json.dumps(asdict(ClaimOwner.me(flow_run_id))).encode())
    except FileExistsError:
        return False
    _hold(case_dir)
    return True


def read_claim(case_dir: Path) -> ClaimOwner | None:
    """The owner recorded in ``.processing``; None if absent, empty or foreign (mercure's).

    Keys a later release may add are ignored, so hosts of two releases can share the folders.
    """
    try:
        data = json.loads((case_dir / PROCESSING).read_text() or "null")
        if not isinstance(data, dict):
            return None
        return ClaimOwner(**{k: v for k, v in data.items() if k in _FIELDS})
    except (OSError, ValueError, TypeError):
        return None


def claim_age(case_dir: Path, owner: ClaimOwner, now: float | None = None) -> float:
    """Seconds since the holder last refreshed the claim (file time for claims without one)."""
    now = time.time() if now is None else now
    last = owner.heartbeat
    if last is None:
        try:
            last = (case_dir / PROCESSING).stat().st_mtime
        except OSError:
            return 0.0
    return now - last


def record_claim_run(case_dir: Path, flow_run_id: str) -> None:
    """Add the flow run id to our claim, so a claim can be traced (and judged) by its run.

    A claim queued for this run is adopted: it becomes this process's, with a fresh heartbeat.
    """
    with _lock:
        owner = read_claim(case_dir)
        if owner is None or not (owner.is_this_process() or owner.is_queued_for(flow_run_id)):
            return
        if owner.queued:
            mine = dataclasses.replace(ClaimOwner.me(flow_run_id), claimed_at=owner.claimed_at)
        else:
            mine = dataclasses.replace(owner, flow_run_id=flow_run_id)
        _rewrite(case_dir, mine)
        _held.add(case_dir)
    _ensure_refresher()


def queue_claim(case_dir: Path, flow_run_id: str) -> bool:
    """Hand our claim to a flow run a worker will start; this process stops refreshing it."""
    with _lock:
        owner = read_claim(case_dir)
        if owner is None or not owner.is_this_process():
            return False
        queued = dataclasses.replace(
            owner, flow_run_id=flow_run_id, queued=True, heartbeat=time.time()
        )
        _rewrite(case_dir, queued)
        _held.discard(case_dir)
        return True


def release_claim(case_dir: Path) -> None:
    with _lock:
        _held.discard(case_dir)
        (case_dir / PROCESSING).unlink(missing_ok=True)


def claim_is_stale(case_dir: Path) -> bool:
    """True when the claim was made on this host by a process that no longer exists.

    An empty or foreign marker (mercure's dispatcher writes none) is never judged stale here:
    its owner cannot be proven gone. Claims from other hosts, and queued claims, are judged by
    their flow run (``flows/takeover.py``).
    """
    owner = read_claim(case_dir)
    if owner is None or owner.queued or owner.host != host_id():
        return False
    started = _process_started(owner.pid)
    return started is None or abs(started - owner.process_started) > 1.0


# ---------------------------------------------------------------------------------------------
# the heartbeat

_lock = threading.Lock()
_held: set[Path] = set()
_refresher: threading.Thread | None = None


def _hold(case_dir: Path) -> None:
    with _lock:
        _held.add(case_dir)
    _ensure_refresher()


def _rewrite(case_dir: Path, owner: ClaimOwner) -> None:
    """Replace the marker atomically. The temp file lives beside the case, not in it, so a case
    moved away meanwhile never carries a stray temp file into success/."""
    tmp = case_dir.parent / f".{case_dir.name}{PROCESSING}.{secrets.token_hex(8)}.tmp"
    try:
        with open_new(tmp) as fh:  # exclusive, no link followed: nothing planted is written
            fh.write(json.dumps(asdict(owner)).encode())
        os.replace(tmp, case_dir / PROCESSING)
    except OSError:
        tmp.unlink(missing_ok=True)
        raise


def refresh_held_claims(now: float | None = None) -> int:
    """Rewrite the heartbeat of every claim this process holds; returns how many."""
    now = time.time() if now is None else now
    refreshed = 0
    with _lock:
        for case_dir in list(_held):
            owner = read_claim(case_dir)
            if owner is None or not owner.is_this_process():
                _held.discard(case_dir)  # released or moved on without us noticing
                continue
            try:
                _rewrite(case_dir, dataclasses.replace(owner, heartbeat=now))
                refreshed += 1
            except OSError as exc:
                _held.discard(case_dir)
                LOGGER.debug("claim of %s not refreshed: %s", case_dir.name, exc)
    return refreshed


def _ensure_refresher() -> None:
    global _refresher
    with _lock:
        if _refresher is not None and _refresher.is_alive():
            return
        _refresher = threading.Thread(target=_refresh_forever, name="claim-heartbeat", daemon=True)
        _refresher.start()


def _refresh_forever() -> None:
    while True:
        time.sleep(CLAIM_HEARTBEAT_SECONDS)
        try:
            refresh_held_claims()
        except Exception:  # never let the heartbeat die of one bad folder
            LOGGER.exception("could not refresh the claims")
