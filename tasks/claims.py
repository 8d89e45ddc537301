"""The claim marker ``.processing``: who holds a case, and the heartbeat that says they still do.

A claim is created exclusively (``O_EXCL``: the one thing that keeps two dispatchers, on one host
or several, from sending the same case) and holds its owner as JSON: host (``blocks.host.host_id``),
pid, the process's start time, when it was claimed, the flow run, and a ``heartbeat``. While a
process holds claims, a daemon thread rewrites each of them every ``CLAIM_HEARTBEAT_SECONDS``
(atomically: temp file + rename). The refresh needs no Prefect API, so an owner cut off from the
API still shows it is alive, and another host may take a case over only when the claim's
heartbeat is older than the takeover window AND its flow run has ended (``flows/takeover.py``).

A claim changes hands by rename, never by check-then-unlink: whoever judged a claim dead renames
it to a unique name and reads it again there (:func:`release_dead_claim`); only the one that still
finds the owner it judged goes on, and a live claim found under that name is put back with
``link()``, which never overwrites. An owner knows its claim by its inode (``st_dev``,
``st_ino``, of the file it last wrote): the heartbeat rewrites only that file, and before each
send and each move :func:`ensure_claim_held` stops an attempt whose claim was taken over.

The marker is read without following a link, without blocking, and only up to
``MAX_CLAIM_BYTES``: a ``.processing`` that is a link, a FIFO, a device or larger is a foreign
claim, like mercure's empty one: never judged dead, never taken over (logged once).

A claim may also be *queued*: the work-pool sweep claims a case for a flow run that a worker has
not started yet (no process owns it); the run adopts the claim when it starts.

No Prefect here: the folder protocol imports it.

Over 400 lines on purpose: the claim's content, its atomic hand-over (rename + re-read), the
owner's check and the heartbeat refer to each other and are tested together
(``tests/unit/test_claims_takeover.py``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import errno
import json
import logging
import os
import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import psutil

from blocks.host import claim_heartbeat_seconds, host_id
from tasks.periodic import Periodic
from tasks.safefiles import create_new, open_new, read_regular_stat

__all__ = [
    "CLAIM_HEARTBEAT_SECONDS",
    "MAX_CLAIM_BYTES",
    "PROCESSING",
    "ClaimLost",
    "ClaimOwner",
    "claim_age",
    "claim_case",
    "claim_is_stale",
    "ensure_claim_held",
    "holds_claim",
    "queue_claim",
    "read_claim",
    "record_claim_run",
    "refresh_held_claims",
    "release_claim",
    "release_dead_claim",
    "release_own_claim",
    "release_stale_claim",
]

LOGGER = logging.getLogger(__name__)

PROCESSING = ".processing"
#: How often a holder rewrites its claims; a third of the shortest takeover window allowed.
CLAIM_HEARTBEAT_SECONDS = 15.0
#: A claim is a few hundred bytes; a larger ``.processing`` is not ours and is not read whole.
MAX_CLAIM_BYTES = 64 * 1024

#: A file's identity: (``st_dev``, ``st_ino``).
FileId = tuple[int, int]


class ClaimLost(Exception):
    """The claim this process made is no longer the one in the case folder: it was taken over
    (its owner was judged dead). The attempt stops: it sends nothing more, moves nothing and
    releases nothing; the case is its new owner's."""


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
        owner = ClaimOwner.me(flow_run_id)
        made = create_new(case_dir / PROCESSING, json.dumps(asdict(owner)).encode())
    except FileExistsError:
        return False
    _hold(case_dir, (owner, _file_id(made)))
    return True


def read_claim(case_dir: Path) -> ClaimOwner | None:
    """The owner recorded in ``.processing``; None if absent, empty or foreign (mercure's).

    Keys a later release may add are ignored, so hosts of two releases can share the folders.
    """
    return _read(case_dir / PROCESSING)[0]


def _read(marker: Path, *, report: bool = True) -> tuple[ClaimOwner | None, FileId | None]:
    """The owner in the claim file ``marker`` and the file's identity (None, None if absent).

    Read without following a link and without blocking, the type checked on the open
    descriptor, at most ``MAX_CLAIM_BYTES`` + 1 bytes: a marker planted as a link to
    ``/dev/zero``, a FIFO or a huge file costs nothing; it reads as a foreign claim.
    """
    try:
        data, status = read_regular_stat(marker, MAX_CLAIM_BYTES)
    except (FileNotFoundError, NotADirectoryError):
        return None, None  # no marker, or the case folder is gone
    except OSError as exc:
        if report:
            _foreign(marker, _FOREIGN.get(exc.errno or 0, exc.strerror or str(exc)))
        return None, None
    try:
        fields = json.loads(data or b"null")
        if not isinstance(fields, dict):
            return None, None
        return ClaimOwner(**{k: v for k, v in fields.items() if k in _FIELDS}), _file_id(status)
    except (ValueError, TypeError):
        return None, None


_FOREIGN = {
    errno.ELOOP: "it is a symbolic link",
    errno.EINVAL: "it is not a regular file",
    errno.EFBIG: f"it is over {MAX_CLAIM_BYTES} bytes",
}
#: Markers already reported as foreign (each is logged once, not at every scan); bounded.
_reported: set[Path] = set()
_REPORTED_MAX = 10_000


def _foreign(marker: Path, why: str) -> None:
    """Log once that ``marker`` is a foreign claim that is never released automatically."""
    if marker in _reported:
        return
    if len(_reported) >= _REPORTED_MAX:
        _reported.clear()
    _reported.add(marker)
    LOGGER.warning(
        "case %s: %s is a foreign claim (%s), never released automatically: remove it "
        "once no one is sending the case",
        marker.parent.name,
        PROCESSING,
        why,
    )


def _file_id(st: os.stat_result) -> FileId:
    return st.st_dev, st.st_ino


def _lstat_id(path: Path) -> FileId | None:
    try:
        return _file_id(os.lstat(path))
    except OSError:
        return None


def claim_age(case_dir: Path, owner: ClaimOwner, now: float | None = None) -> float:
    """Seconds since the holder last refreshed the claim (file time for claims without one)."""
    now = time.time() if now is None else now
    last = owner.heartbeat
    if last is None:
        try:
            last = os.lstat(case_dir / PROCESSING).st_mtime
        except OSError:
            return 0.0
    return now - last


def record_claim_run(case_dir: Path, flow_run_id: str) -> None:
    """Add the flow run id to our claim, so a claim can be traced (and judged) by its run.

    A claim queued for this run is adopted: it becomes this process's, with a fresh heartbeat.
    """
    with _lock:
        found = _read(case_dir / PROCESSING)
        owner, ident = found
        if owner is None or ident is None:
            return
        if owner.is_queued_for(flow_run_id):
            mine = dataclasses.replace(ClaimOwner.me(flow_run_id), claimed_at=owner.claimed_at)
        elif owner.is_this_process() and _held.get(_key(case_dir)) == found:
            mine = dataclasses.replace(owner, flow_run_id=flow_run_id)
        else:
            return
        written = _rewrite(case_dir, mine, (owner, ident))
        if written is None:
            return
        _held[_key(case_dir)] = written
    _ensure_refresher()


def queue_claim(case_dir: Path, flow_run_id: str) -> bool:
    """Hand our claim to a flow run a worker will start; this process stops refreshing it."""
    with _lock:
        key = _key(case_dir)
        mine = _held.get(key)
        if mine is None or _read(case_dir / PROCESSING) != mine:
            return False
        owner = mine[0]
        queued = dataclasses.replace(
            owner, flow_run_id=flow_run_id, queued=True, heartbeat=time.time()
        )
        written = _rewrite(case_dir, queued, mine)
        _held.pop(key, None)
        return written is not None


def release_claim(case_dir: Path) -> None:
    """Remove the marker, whoever's it is: for a case this process has just moved (the marker
    travelled with it). A claim the case may still be under is freed by
    :func:`release_own_claim` or :func:`release_dead_claim`."""
    with _lock:
        _held.pop(_key(case_dir), None)
        (case_dir / PROCESSING).unlink(missing_ok=True)


def release_own_claim(case_dir: Path) -> bool:
    """Free our claim on the case, if the marker there is still the file we wrote; True if so.

    A claim taken over meanwhile is left to its new owner (it is taken aside by rename and put
    back if it is not ours, never unlinked on a judgement made earlier).
    """
    with _lock:
        mine = _held.pop(_key(case_dir), None)
    if mine is None:
        return False
    return _take_away(case_dir, lambda aside: _read(aside, report=False) == mine)


def release_dead_claim(case_dir: Path, judged: ClaimOwner) -> bool:
    """Release a claim judged dead, atomically; True only for the one process that did.

    The marker is renamed to a unique name and read again there: only when it still records the
    owner that was judged dead is it removed (the caller then claims the case normally, with
    ``O_EXCL``). Anything else found there (a live claim someone made meanwhile) is put back
    with ``link()``, which never overwrites a claim made in between.
    """
    return _take_away(case_dir, lambda aside: _read(aside, report=False)[0] == judged)


def _take_away(case_dir: Path, is_the_one: Callable[[Path], bool]) -> bool:
    """Rename the marker aside and remove it if ``is_the_one`` (given its temporary name) says
    so, else put it back; True if it was removed."""
    aside = _grab(case_dir)
    if aside is None:
        return False
    try:
        removable = is_the_one(aside)
    except BaseException:
        _put_back(aside, case_dir)
        raise
    if removable:
        aside.unlink(missing_ok=True)
        return True
    _put_back(aside, case_dir)
    return False


def _grab(case_dir: Path) -> Path | None:
    """Rename the marker to a unique name beside the case (not in it: a case moved meanwhile
    carries nothing of ours); None if there is no marker to take, or it cannot be moved (a
    folder the service may not write: the case stays as it is)."""
    aside = case_dir.parent / f".{case_dir.name}{PROCESSING}.{secrets.token_hex(8)}.taken"
    try:
        os.rename(case_dir / PROCESSING, aside)
    except (FileNotFoundError, NotADirectoryError):
        return None
    except OSError as exc:
        LOGGER.debug("case %s: claim not taken aside: %s", case_dir.name, exc)
        return None
    return aside


def _put_back(aside: Path, case_dir: Path) -> None:
    """Return a claim taken aside to its case without ever overwriting one made meanwhile."""
    marker = case_dir / PROCESSING
    try:
        os.link(aside, marker, follow_symlinks=False)
    except FileExistsError:
        # Claimed again in between: that claim stands; the one taken aside is gone, and its
        # owner stops at its next check (the inode it holds is no longer there).
        LOGGER.warning("case %s: a claim taken aside for a check was replaced", case_dir.name)
    except FileNotFoundError:
        pass  # the case moved on (its owner finished it)
    except OSError as exc:  # not a file link() can copy (a folder): back by rename, if free
        if _lstat_id(marker) is None:
            with contextlib.suppress(OSError):
                os.rename(aside, marker)
                return
        LOGGER.error(
            "case %s: %s could not be put back (%s): %s", case_dir.name, marker, exc, aside
        )
        return
    aside.unlink(missing_ok=True)


def holds_claim(case_dir: Path) -> bool:
    """Whether the case's marker is still the file this process last wrote for it: the same
    inode with the same owner (a freed inode number is soon reused, by the next claim made
    there too). A claim found replaced is forgotten: it is no longer refreshed."""
    key = _key(case_dir)
    with _lock:
        mine = _held.get(key)
        if mine is None:
            return False
        if _read(case_dir / PROCESSING) == mine:
            return True
        _held.pop(key, None)
    LOGGER.warning(
        "case %s: the claim is no longer this process's (taken over or removed); left as it is",
        case_dir.name,
    )
    return False


def ensure_claim_held(case_dir: Path) -> None:
    """Raise :class:`ClaimLost` unless this process still holds the case (before a send)."""
    if not holds_claim(case_dir):
        raise ClaimLost(
            f"case {case_dir.name} is no longer claimed by this process (taken over); "
            "left to its new owner"
        )


def claim_is_stale(case_dir: Path) -> bool:
    """True when the claim was made on this host by a process that no longer exists.

    An empty or foreign marker (mercure's dispatcher writes none) is never judged stale here:
    its owner cannot be proven gone. Claims from other hosts, and queued claims, are judged by
    their flow run (``flows/takeover.py``).
    """
    owner = read_claim(case_dir)
    return owner is not None and _owner_is_gone(owner)


def release_stale_claim(case_dir: Path) -> ClaimOwner | None:
    """Release the claim of a process of this host that is gone (:func:`claim_is_stale`),
    atomically (:func:`release_dead_claim`); the owner released, or None."""
    owner = read_claim(case_dir)
    if owner is None or not _owner_is_gone(owner):
        return None
    return owner if release_dead_claim(case_dir, owner) else None


def _owner_is_gone(owner: ClaimOwner) -> bool:
    if owner.queued or owner.host != host_id():
        return False
    started = _process_started(owner.pid)
    return started is None or abs(started - owner.process_started) > 1.0


# ---------------------------------------------------------------------------------------------
# the heartbeat

_lock = threading.RLock()
#: What this process last wrote as a case's claim: the owner recorded and the file's identity.
Mine = tuple[ClaimOwner, FileId]
#: The claims this process holds, by case folder.
_held: dict[Path, Mine] = {}
_refresher: threading.Thread | None = None


def _key(case_dir: Path) -> Path:
    return Path(os.path.abspath(case_dir))


def _hold(case_dir: Path, mine: Mine) -> None:
    with _lock:
        _held[_key(case_dir)] = mine
    _ensure_refresher()


def _rewrite(case_dir: Path, owner: ClaimOwner, expected: Mine) -> Mine | None:
    """Replace the marker atomically if it is still the claim ``expected``; the new claim, or
    None when the marker was replaced by someone else (then it is left as it is).

    The temp file lives beside the case, not in it, so a case moved away meanwhile never
    carries a stray temp file into success/. The check and the rename are a few system calls
    apart under the lock; a claim is only taken over once its heartbeat is a takeover window
    old, so a takeover landing in between needs this process to stall there for that long.
    """
    tmp = case_dir.parent / f".{case_dir.name}{PROCESSING}.{secrets.token_hex(8)}.tmp"
    try:
        with open_new(tmp) as fh:  # exclusive, no link followed: nothing planted is written
            fh.write(json.dumps(asdict(owner)).encode())
            written = _file_id(os.fstat(fh.fileno()))
        if _read(case_dir / PROCESSING) != expected:
            tmp.unlink(missing_ok=True)
            return None
        os.replace(tmp, case_dir / PROCESSING)
    except OSError:
        tmp.unlink(missing_ok=True)
        raise
    return owner, written


def refresh_held_claims(now: float | None = None) -> int:
    """Rewrite the heartbeat of every claim this process holds; returns how many.

    Only the marker file this process last wrote is rewritten: a claim taken over (another
    inode in its place), released or moved on is forgotten, never brought back.
    """
    now = time.time() if now is None else now
    refreshed = 0
    with _lock:
        for case_dir, mine in list(_held.items()):
            found = _read(case_dir / PROCESSING)
            if found != mine:  # released, moved on, or taken over
                del _held[case_dir]
                if found[1] is not None:
                    LOGGER.warning("case %s: the claim was taken over", case_dir.name)
                continue
            owner = mine[0]
            try:
                written = _rewrite(case_dir, dataclasses.replace(owner, heartbeat=now), mine)
            except OSError as exc:
                del _held[case_dir]
                LOGGER.debug("claim of %s not refreshed: %s", case_dir.name, exc)
                continue
            if written is None:
                del _held[case_dir]
                LOGGER.warning("case %s: the claim was taken over", case_dir.name)
                continue
            _held[case_dir] = written
            refreshed += 1
    return refreshed


def _ensure_refresher() -> None:
    global _refresher
    with _lock:
        if _refresher is not None and _refresher.is_alive():
            return
        _refresher = HEARTBEAT.start_thread()


#: Runs as long as the process: a thread, since claims are taken outside any event loop too.
HEARTBEAT = Periodic(
    "claim-heartbeat",
    refresh_held_claims,
    lambda: claim_heartbeat_seconds(CLAIM_HEARTBEAT_SECONDS),
    logger=LOGGER,
)
