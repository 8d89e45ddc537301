"""What a C-STORE or C-ECHO call returns: per-instance DIMSE statuses as data, and their judge.

A status is never raised: :func:`store_failure_is_transient` and :func:`stored` judge them for
both DICOM backends (pynetdicom's ``DicomTarget.send`` and dcmsend's report, ``blocks._dcmsend``),
from one table (:data:`STORE_STATUSES`), and ``blocks._dcmsend_report`` writes these results in
dcmsend's report layout. Prefect-free.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Protocol

__all__ = [
    "STORE_STATUSES",
    "EchoResult",
    "InstanceResult",
    "StatusRange",
    "StoreResult",
    "Unstored",
    "status_category",
    "status_text",
    "store_failure_is_transient",
    "stored",
]


@dataclass(frozen=True)
class StatusRange:
    """A range of DIMSE status codes (both ends included) and what it means for a C-STORE."""

    first: int
    last: int
    category: str  # "success", "warning" or "failure"
    meaning: str
    #: A quick retry may store the instance (the peer was short of resources, not refusing it).
    transient: bool = False

    def __contains__(self, code: int) -> bool:
        return self.first <= code <= self.last


#: C-STORE response statuses (PS3.4 B.2.3, PS3.7 C), as pynetdicom's status tables hold them:
#: data, not branches. A code in no row (pending 0xFF0x, cancel 0xFE00, failures of PS3.7 C,
#: unknown codes) is a permanent failure: for a C-STORE none of them means the instance was stored.
STORE_STATUSES: tuple[StatusRange, ...] = (
    StatusRange(0x0000, 0x0000, "success", "success"),
    StatusRange(0x0001, 0x0001, "warning", "requested optional attributes are not supported"),
    StatusRange(0x0107, 0x0107, "warning", "attribute list error"),
    StatusRange(0x0116, 0x0116, "warning", "attribute value out of range"),
    StatusRange(0xB000, 0xBFFF, "warning", "coercion of data elements, element discarded, ..."),
    StatusRange(0xA700, 0xA7FF, "failure", "refused: out of resources", transient=True),
    StatusRange(0xA900, 0xA9FF, "failure", "data set does not match SOP class"),
    StatusRange(0xC000, 0xCFFF, "failure", "cannot understand"),
)
_UNLISTED = StatusRange(0x0000, 0xFFFF, "failure", "not a C-STORE success")


def _row(code: int) -> StatusRange:
    return next((row for row in STORE_STATUSES if code in row), _UNLISTED)


def status_category(code: int | None) -> str:
    """``"success"``, ``"warning"``, ``"failure"`` or ``"none"`` (no response) for a status."""
    return "none" if code is None else _row(code).category


def status_text(code: int | None) -> str:
    """Short text for messages and logs: ``"0xA700 (failure)"``, or ``"no response"``."""
    if code is None:
        return "no response"
    return f"0x{code:04X} ({status_category(code)})"


def stored(code: int | None, warnings_ok: bool = True) -> bool:
    """The instance was stored: success, or a warning when ``warnings_ok``."""
    category = status_category(code)
    return category == "success" or (warnings_ok and category == "warning")


class Unsent(Protocol):
    """An instance that was not stored, as :func:`store_failure_is_transient` needs it."""

    @property
    def status(self) -> int | None: ...

    @property
    def no_context(self) -> bool: ...


@dataclass(frozen=True)
class Unstored:
    """An instance not stored, as dcmsend's report tells it (no ``InstanceResult`` there)."""

    status: int | None
    no_context: bool = False


def store_failure_is_transient(failed: Iterable[Unsent]) -> bool:
    """Whether a quick retry of the send may store every instance that was not stored.

    Only when *all* of them failed for a reason a retry can fix: no response (or not sent: the
    association broke first) or a status of a transient row (out of resources, 0xA7xx). One
    permanent failure (0xA900 "data set does not match SOP class", no accepted presentation
    context, ...) makes the whole send permanent: a retry resends every instance and cannot store
    that one, so the case would only be retried in vain; the folder protocol's retries
    (``retry_delay``, ``retry_max``) still give it its attempts, as mercure does for any failure.
    Nothing failed (a report that does not add up): permanent, there is nothing to retry.
    """
    verdicts = [
        not item.no_context and (item.status is None or _row(item.status).transient)
        for item in failed
    ]
    return bool(verdicts) and all(verdicts)


@dataclass(frozen=True)
class InstanceResult:
    """What happened to one file.

    ``status`` is the DIMSE status of the C-STORE response, or ``None`` when there is none: not
    sent (``error`` says why), or sent but no response came (timeout, abort, lost response).
    ``None`` never means stored.
    """

    path: Path
    sop_class_uid: str
    sop_instance_uid: str
    transfer_syntax: str
    size: int
    status: int | None
    association: int
    context_id: int | None
    network_transfer_syntax: str | None
    error: str | None
    #: The peer accepted no presentation context this instance could be sent on.
    no_context: bool = False
    #: The C-STORE request went out (``status`` may still be ``None``: no response).
    request_sent: bool = False

    @property
    def category(self) -> str:
        """``status_category(self.status)``."""
        return status_category(self.status)

    def ok(self, warnings_ok: bool = True) -> bool:
        """Stored: success, or a warning when ``warnings_ok``."""
        return stored(self.status, warnings_ok)


@dataclass
class StoreResult:
    """Outcome of one ``store_files`` call: per-instance statuses, in the order of the files."""

    peer: str
    calling_aet: str
    called_aet: str
    started: datetime
    instances: list[InstanceResult]
    associations: int
    #: Presentation contexts proposed, summed over all associations (dcmsend's counter).
    presentation_contexts: int = 0
    #: Wall time of the call in seconds.
    elapsed: float = 0.0

    def accepted(self, warnings_ok: bool = True) -> bool:
        """Every instance stored (success, or warning when ``warnings_ok``)."""
        return all(i.ok(warnings_ok) for i in self.instances)

    def failed(self, warnings_ok: bool = True) -> list[InstanceResult]:
        """Instances not stored: failure status, no response, or not sent."""
        return [i for i in self.instances if not i.ok(warnings_ok)]

    def counts(self) -> dict[str, int]:
        """Number of instances per ``status_category``."""
        out = {"success": 0, "warning": 0, "failure": 0, "none": 0}
        for instance in self.instances:
            out[instance.category] += 1
        return out


@dataclass(frozen=True)
class EchoResult:
    """C-ECHO outcome; truthy when the peer answered 0x0000."""

    ok: bool
    status: int | None
    detail: str

    def __bool__(self) -> bool:
        return self.ok
