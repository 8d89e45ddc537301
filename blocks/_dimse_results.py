"""What a C-STORE or C-ECHO call returns: per-instance DIMSE statuses as data.

A status is never raised: the caller (``DicomTarget.send``) decides what is worth a retry, and
``blocks._dcmsend_report`` writes these results in dcmsend's report layout. Prefect-free.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from pynetdicom.status import code_to_category

__all__ = ["EchoResult", "InstanceResult", "StoreResult", "status_category", "status_text"]


def status_category(code: int | None) -> str:
    """``"success"``, ``"warning"``, ``"failure"`` or ``"none"`` (no response) for a status.

    Pending, cancel and unknown codes count as failure: for a C-STORE none of them means the
    instance was stored.
    """
    if code is None:
        return "none"
    category = code_to_category(code)
    if category == "Success":
        return "success"
    if category == "Warning":
        return "warning"
    return "failure"


def status_text(code: int | None) -> str:
    """Short text for messages and logs: ``"0xA700 (failure)"``, or ``"no response"``."""
    if code is None:
        return "no response"
    return f"0x{code:04X} ({status_category(code)})"


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
        category = self.category
        return category == "success" or (warnings_ok and category == "warning")


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
