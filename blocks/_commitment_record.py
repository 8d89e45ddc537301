"""Storage Commitment transactions, recorded beside the case they belong to.

A commitment request (N-ACTION) may be answered minutes later, on a new association, to
whichever host's listener the PACS reaches, after the attempt that asked has ended. So what was
asked is not kept in memory nor in ``task.json`` (one writer at a time, rewritten by every
target) but in sidecar files in the case folder, one pair per transaction, each with one writer:

* ``.storage-commitment.<transaction UID>.json``: the request (target, instances, time), written
  by the sender before its N-ACTION goes out;
* ``.storage-commitment.<transaction UID>.report.json``: the answer, written by whoever receives
  the N-EVENT-REPORT (the sender on its own association, or a listener), only when the request
  file is there (an unknown transaction is ignored) and only once (the first answer stands).

Both are created new (``tasks.safefiles.create_new``: never through a link, never over anything)
and read without following a link, size-capped. :func:`commitment_state` folds a target's files
into what is committed, failed and still pending; a report that arrives late is applied on the
next look. Prefect-free.
"""

from __future__ import annotations

import json
import logging
import re
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tasks.safefiles import create_new, read_regular

__all__ = [
    "RECORD_PREFIX",
    "CommitmentReport",
    "CommitmentRequest",
    "CommitmentState",
    "commitment_state",
    "find_request",
    "record_report",
    "record_request",
    "report_path",
    "request_path",
]

LOGGER = logging.getLogger(__name__)

RECORD_PREFIX = ".storage-commitment."
#: A record larger than this is not ours (a request lists UIDs only: ≈ 130 bytes per instance).
_MAX_RECORD_BYTES = 64 * 1024 * 1024
_UID = re.compile(r"^[0-9]+(\.[0-9]+)*$")

#: (SOP Class UID, SOP Instance UID) of one instance.
Instance = tuple[str, str]


def request_path(case_dir: Path, transaction_uid: str) -> Path:
    """The request record of ``transaction_uid`` in ``case_dir``."""
    return case_dir / f"{RECORD_PREFIX}{_checked_uid(transaction_uid)}.json"


def report_path(case_dir: Path, transaction_uid: str) -> Path:
    return case_dir / f"{RECORD_PREFIX}{_checked_uid(transaction_uid)}.report.json"


def _checked_uid(uid: str) -> str:
    """A UID safe to put in a file name (digits and dots only, at most 64 characters)."""
    if not _UID.match(uid) or len(uid) > 64:
        raise ValueError(f"not a UID: {uid[:80]!r}")
    return uid


@dataclass(frozen=True)
class CommitmentRequest:
    """One N-ACTION: which target asked, for which instances, when (epoch seconds)."""

    transaction_uid: str
    target: str
    instances: tuple[Instance, ...]
    requested_at: float

    def to_json(self) -> dict[str, Any]:
        return {
            "transaction_uid": self.transaction_uid,
            "target": self.target,
            "instances": [list(i) for i in self.instances],
            "requested_at": self.requested_at,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> CommitmentRequest:
        return cls(
            transaction_uid=str(data["transaction_uid"]),
            target=str(data["target"]),
            instances=tuple((str(c), str(i)) for c, i in data["instances"]),
            requested_at=float(data["requested_at"]),
        )


@dataclass(frozen=True)
class CommitmentReport:
    """One N-EVENT-REPORT: instances committed, instances failed (with the failure reason)."""

    transaction_uid: str
    committed: tuple[Instance, ...] = ()
    failed: tuple[tuple[str, str, int], ...] = ()
    received_at: float = 0.0
    #: ``"same association"`` or ``"listener"``: how the answer came.
    via: str = ""

    def to_json(self) -> dict[str, Any]:
        return {
            "transaction_uid": self.transaction_uid,
            "committed": [list(i) for i in self.committed],
            "failed": [list(f) for f in self.failed],
            "received_at": self.received_at,
            "via": self.via,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> CommitmentReport:
        return cls(
            transaction_uid=str(data["transaction_uid"]),
            committed=tuple((str(c), str(i)) for c, i in data.get("committed", [])),
            failed=tuple((str(c), str(i), int(r)) for c, i, r in data.get("failed", [])),
            received_at=float(data.get("received_at", 0.0)),
            via=str(data.get("via", "")),
        )


def _write(path: Path, data: dict[str, Any]) -> None:
    create_new(path, json.dumps(data, indent=1).encode())


def _read(path: Path) -> dict[str, Any] | None:
    """A record's JSON, or None when it is missing, a link, not a file or not ours."""
    try:
        data = json.loads(read_regular(path, _MAX_RECORD_BYTES))
    except FileNotFoundError:
        return None
    except (OSError, ValueError, RecursionError) as exc:
        LOGGER.warning("ignoring storage commitment record %s: %s", path.name, exc)
        return None
    return data if isinstance(data, dict) else None


def record_request(case_dir: Path, request: CommitmentRequest) -> None:
    """Write the request record (before the N-ACTION, so a quick answer finds it)."""
    _write(request_path(case_dir, request.transaction_uid), request.to_json())


def record_report(case_dir: Path, report: CommitmentReport) -> bool:
    """Record an answer for a transaction of ``case_dir``; False (nothing written) when the
    transaction is unknown there or was answered already (the first answer stands)."""
    try:
        known = request_path(case_dir, report.transaction_uid)
    except ValueError:
        return False
    if _read(known) is None:
        return False
    try:
        _write(report_path(case_dir, report.transaction_uid), report.to_json())
    except FileExistsError:
        return False
    return True


def find_request(folders: Iterable[Path], transaction_uid: str) -> Path | None:
    """The case folder (in one of ``folders``) that recorded ``transaction_uid``, or None."""
    try:
        name = request_path(Path(), transaction_uid).name
    except ValueError:
        return None
    for folder in folders:
        try:
            for path in folder.glob(f"*/{name}"):
                if _read(path) is not None:
                    return path.parent
        except OSError:
            continue
    return None


def _records(
    case_dir: Path, target: str
) -> list[tuple[CommitmentRequest, CommitmentReport | None]]:
    found: list[tuple[CommitmentRequest, CommitmentReport | None]] = []
    for path in sorted(case_dir.glob(f"{RECORD_PREFIX}*.json")):
        if path.name.endswith(".report.json"):
            continue
        data = _read(path)
        try:
            request = CommitmentRequest.from_json(data) if data is not None else None
        except (KeyError, TypeError, ValueError):
            request = None
        if request is None or request.target != target:
            continue
        answer = _read(report_path(case_dir, request.transaction_uid))
        try:
            report = CommitmentReport.from_json(answer) if answer is not None else None
        except (KeyError, TypeError, ValueError):
            report = None
        found.append((request, report))
    found.sort(key=lambda pair: pair[0].requested_at)
    return found


@dataclass
class CommitmentState:
    """What a target's transactions say about the case's instances (by SOP Instance UID)."""

    committed: set[str] = field(default_factory=set)
    #: SOP Instance UID → failure reason of the latest answer that did not commit it.
    failed: dict[str, int] = field(default_factory=dict)
    #: Asked, no answer yet, not timed out.
    pending: set[str] = field(default_factory=set)
    #: Asked, no answer within the timeout (sent again on the next attempt).
    expired: set[str] = field(default_factory=set)
    #: The latest transaction's UID.
    transaction_uid: str = ""
    #: Seconds until the oldest pending transaction times out (0: none pending).
    wait_left: float = 0.0

    def counts(self, instances: Sequence[str] | None = None) -> dict[str, Any]:
        """``status[target].storage_commitment``: instances of the case, committed / failed /
        pending, the latest transaction UID."""
        wanted = set(instances) if instances is not None else None
        committed = self.committed if wanted is None else self.committed & wanted
        return {
            "instances": len(wanted) if wanted is not None else len(committed),
            "committed": len(committed),
            "failed": len(self.failed),
            "pending": len(self.pending),
            "transaction_uid": self.transaction_uid,
        }

    def settled(self, uid: str) -> bool:
        """Committed or still awaited: not to be sent again now."""
        return uid in self.committed or uid in self.pending


def commitment_state(
    case_dir: Path, target: str, timeout: float, now: float | None = None
) -> CommitmentState:
    """Fold ``target``'s records in ``case_dir``: committed wins over any failure or silence;
    a later answer replaces an earlier failure; an unanswered request older than ``timeout``
    seconds no longer counts as pending."""
    now = time.time() if now is None else now
    state = CommitmentState()
    waits: list[float] = []
    for request, report in _records(case_dir, target):
        state.transaction_uid = request.transaction_uid
        uids = {uid for _, uid in request.instances}
        if report is None:
            left = request.requested_at + timeout - now
            if left > 0:
                state.pending |= uids
                waits.append(left)
            else:
                state.expired |= uids
            continue
        done = {uid for _, uid in report.committed}
        state.committed |= done & uids
        for _, uid, reason in report.failed:
            if uid in uids:
                state.failed[uid] = reason
        for uid in done:
            state.failed.pop(uid, None)
    state.pending -= state.committed
    state.expired -= state.committed | state.pending
    for uid in state.committed | state.pending:
        state.failed.pop(uid, None)
    state.wait_left = max(waits) if waits else 0.0
    return state
