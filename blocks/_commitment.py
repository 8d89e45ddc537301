"""DICOM Storage Commitment (Push Model, PS3.4 J) as the SCU: ask, and take the answer.

After the C-STOREs of an attempt, :func:`request_commitment` opens an association of its own
(whichever backend sent the files: dcmsend cannot do it), records the transaction in the case
folder (``blocks._commitment_record``), sends one N-ACTION (Request Storage Commitment, action
type 1) for the sent instances and takes an N-EVENT-REPORT on that same association if the
peer answers there within ``hold`` seconds. A peer that answers on a new association reaches a
listener instead (``blocks._commitment_scp``, run by ``serve``), which records the answer the
same way; the sender then watches the case folder for it. :func:`parse_report` reads either.

:func:`supports_commitment` is the connection test: whether the peer accepts the Storage
Commitment Push Model SOP class. Prefect-free.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pydicom import Dataset, dcmread
from pydicom.uid import generate_uid
from pynetdicom import evt
from pynetdicom.presentation import build_context
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    StorageCommitmentPushModel,
    StorageCommitmentPushModelInstance,
)

from blocks._association import DicomPeer, NoAcceptedContext, association
from blocks._commitment_record import (
    CommitmentReport,
    CommitmentRequest,
    Instance,
    record_report,
    record_request,
    report_path,
    request_path,
)
from blocks.errors import TargetError, TransientTargetError
from blocks.host import data_dir
from tasks.safefiles import CaseFiles, read_regular

__all__ = [
    "LISTENER_RECORD",
    "case_instances",
    "listener_running",
    "parse_report",
    "request_commitment",
    "supports_commitment",
]

LOGGER = logging.getLogger(__name__)

#: The file (in the data directory) a running listener names itself in: {pid, address, port}.
LISTENER_RECORD = "storage-commitment-listener.json"
#: N-ACTION action type "Request Storage Commitment" (PS3.4 J.3.2).
_REQUEST_COMMITMENT = 1
_SAME_ASSOCIATION = "same association"


def listener_running(target: str) -> bool:
    """Whether a ``serve`` of this host runs the commitment listener for ``target`` (its record
    names a live process and the target), so an answer on a new association is recorded."""
    try:
        record = json.loads(read_regular(data_dir() / LISTENER_RECORD, 1 << 20))
        os.kill(int(record["pid"]), 0)
        return target in record["targets"]
    except (OSError, ValueError, KeyError, TypeError):
        return False


def case_instances(files: CaseFiles, paths: Sequence[Path]) -> dict[Path, Instance]:
    """(SOP Class UID, SOP Instance UID) of each file, from its header, opened no-follow.

    A file that cannot be read is left out: the C-STORE of it fails and names it.
    """
    found: dict[Path, Instance] = {}
    for path in paths:
        try:
            with files.open(path) as fh:
                meta = dcmread(fh, stop_before_pixels=True, specific_tags=["SOPInstanceUID"])
            found[path] = (
                str(meta.file_meta.MediaStorageSOPClassUID),
                str(meta.file_meta.MediaStorageSOPInstanceUID),
            )
        except Exception as exc:  # unreadable: the send reports it
            LOGGER.debug("no instance UID for %s: %s", path.name, exc)
    return found


def _request_dataset(transaction_uid: str, instances: Sequence[Instance]) -> Dataset:
    ds = Dataset()
    ds.TransactionUID = transaction_uid
    items = []
    for sop_class, sop_instance in instances:
        item = Dataset()
        item.ReferencedSOPClassUID = sop_class
        item.ReferencedSOPInstanceUID = sop_instance
        items.append(item)
    ds.ReferencedSOPSequence = items
    return ds


def parse_report(info: Dataset | None, via: str) -> CommitmentReport | None:
    """An N-EVENT-REPORT's Event Information as a report, or None when it names no
    transaction (not a Storage Commitment answer we can use)."""
    uid = str(getattr(info, "TransactionUID", "") or "") if info is not None else ""
    if not uid:
        return None
    committed = tuple(
        (str(item.get("ReferencedSOPClassUID", "")), str(item.get("ReferencedSOPInstanceUID", "")))
        for item in getattr(info, "ReferencedSOPSequence", [])
    )
    failed = tuple(
        (
            str(item.get("ReferencedSOPClassUID", "")),
            str(item.get("ReferencedSOPInstanceUID", "")),
            int(item.get("FailureReason", 0x0110)),
        )
        for item in getattr(info, "FailedSOPSequence", [])
    )
    return CommitmentReport(uid, committed, failed, time.time(), via)


def event_info(event: evt.Event) -> Dataset | None:
    """The Event Information of an N-EVENT-REPORT event; None when it cannot be decoded."""
    try:
        return event.event_information
    except Exception as exc:
        LOGGER.warning("undecodable N-EVENT-REPORT from %s: %s", event.assoc.requestor, exc)
        return None


def request_commitment(
    peer: DicomPeer,
    case_dir: Path,
    target: str,
    instances: Sequence[Instance],
    *,
    hold: float,
) -> str:
    """Ask ``peer`` to commit ``instances``; the new transaction's UID.

    The request is recorded in ``case_dir`` first. The association stays open up to ``hold``
    seconds for an answer on it (recorded as it arrives), and closes sooner once the answer
    is recorded, by us or a listener. Raises ``TransientTargetError`` when the peer cannot be
    reached or refuses the N-ACTION, ``PermanentTargetError`` when it does not accept the SOP
    class.
    """
    transaction_uid = str(generate_uid())
    answered = threading.Event()

    def on_report(event: evt.Event) -> tuple[int, Dataset | None]:
        report = parse_report(event_info(event), _SAME_ASSOCIATION)
        if report is None or report.transaction_uid != transaction_uid:
            LOGGER.warning("%s: N-EVENT-REPORT for an unknown transaction ignored", peer.address)
            return 0x0000, None
        record_report(case_dir, report)
        answered.set()
        return 0x0000, None

    context = build_context(StorageCommitmentPushModel)
    handlers = [(evt.EVT_N_EVENT_REPORT, on_report)]
    with association(peer, [context], handlers=handlers) as assoc:
        record_request(
            case_dir,
            CommitmentRequest(transaction_uid, target, tuple(instances), time.time()),
        )
        status, _reply = assoc.send_n_action(
            _request_dataset(transaction_uid, instances),
            _REQUEST_COMMITMENT,
            StorageCommitmentPushModel,
            StorageCommitmentPushModelInstance,
        )
        code = int(getattr(status, "Status", -1)) if status is not None else None
        if code != 0x0000:
            # Never asked after all: the instances must not wait as pending for an answer.
            request_path(case_dir, transaction_uid).unlink(missing_ok=True)
            why = "no N-ACTION response" if code is None else f"N-ACTION status 0x{code:04X}"
            raise TransientTargetError(
                f"storage commitment request to {peer.describe()} failed: {why}"
            )
        report_file = report_path(case_dir, transaction_uid)
        deadline = time.monotonic() + hold
        while not answered.is_set() and time.monotonic() < deadline and assoc.is_established:
            if report_file.exists():  # a listener recorded it
                break
            answered.wait(0.05)
    return transaction_uid


def supports_commitment(peer: DicomPeer, *, timeout: float = 5) -> bool:
    """Whether ``peer`` accepts the Storage Commitment Push Model SOP class; never raises."""
    try:
        with association(peer.with_timeout(timeout), [build_context(StorageCommitmentPushModel)]):
            return True
    except NoAcceptedContext:
        return False
    except TargetError as exc:
        LOGGER.info("storage commitment probe of %s: %s", peer.describe(), exc)
        return False


def describe(counts: dict[str, Any], total: int) -> str:
    """``storage commitment: 3 of 5 committed, 1 failed, 1 pending``."""
    return (
        f"storage commitment: {counts['committed']} of {total} committed, "
        f"{counts['failed']} failed, {counts['pending']} pending"
    )
