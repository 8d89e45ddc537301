"""An in-process pynetdicom Storage SCP that is also a scriptable Storage Commitment SCP.

Orthanc commits everything it stored and always answers on a new association; to prove how a
sender treats a partial failure, silence, or an answer for a transaction nobody asked about,
the tests need a peer that answers exactly as told:

* ``answer="same"``: the N-EVENT-REPORT on the association of the N-ACTION (after its
  response); ``"new"``: on a new association to ``reply_to`` (host, port, AE title), as Orthanc
  does; ``"silent"``: never.
* ``fail_once``: SOP Instance UIDs reported as failed the first time they are asked about
  (committed when asked again).
* ``unknown_first``: on a new association, first a report for a transaction nobody asked about.

What arrived (C-STOREs, N-ACTIONs) is recorded in order.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from pydicom import Dataset
from pydicom.uid import generate_uid
from pynetdicom import AE, evt
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    StorageCommitmentPushModel,
    StorageCommitmentPushModelInstance,
)

from .base import ListeningSCP, serving_scp, storage_scp_ae

__all__ = ["CommitmentSCP", "commitment_scp"]

VERIFICATION = "1.2.840.10008.1.1"


@dataclass
class CommitmentSCP(ListeningSCP):
    """Handle on a running SCP: where it listens, what it received, how it answers."""

    answer: str
    reply_to: tuple[str, int, str] | None = None
    fail_once: set[str] = field(default_factory=set)
    unknown_first: bool = False
    stored: list[str] = field(default_factory=list)
    #: (transaction UID, SOP Instance UIDs asked about) per N-ACTION.
    actions: list[tuple[str, list[str]]] = field(default_factory=list)
    #: Status of each N-EVENT-REPORT sent on a new association (None: not answered).
    report_statuses: list[int | None] = field(default_factory=list)
    failed_reported: set[str] = field(default_factory=set)


def _referenced(sop_class: str, uid: str, **more: Any) -> Dataset:
    """One item of a report's Referenced or Failed SOP Sequence."""
    item = Dataset()
    item.ReferencedSOPClassUID = sop_class
    item.ReferencedSOPInstanceUID = uid
    for keyword, value in more.items():
        setattr(item, keyword, value)
    return item


def _report(
    transaction: str, committed: list[tuple[str, str]], failed: list[tuple[str, str]]
) -> Dataset:
    """The Event Information of an N-EVENT-REPORT, written here without the product's code, so
    that the product's reading of it is checked against an independent writer."""
    info = Dataset()
    info.TransactionUID = transaction
    info.ReferencedSOPSequence = [_referenced(*one) for one in committed]
    if failed:
        # 0x0110: processing failure
        info.FailedSOPSequence = [_referenced(*one, FailureReason=0x0110) for one in failed]
    return info


@contextmanager
def commitment_scp(
    answer: str = "same",
    *,
    aet: str = "COMMITSCP",
    fail_once: set[str] | None = None,
    reply_to: tuple[str, int, str] | None = None,
    unknown_first: bool = False,
) -> Iterator[CommitmentSCP]:
    """Run the SCP on 127.0.0.1 (free port) until the ``with`` block ends."""
    ae = storage_scp_ae(aet, VERIFICATION, StorageCommitmentPushModel)
    ae.maximum_pdu_size = 0
    lock = threading.Lock()
    holder: dict[str, CommitmentSCP] = {}
    threads: list[threading.Thread] = []

    def on_store(event: evt.Event) -> int:
        with lock:
            holder["scp"].stored.append(str(event.request.AffectedSOPInstanceUID))
        return 0x0000

    def on_action(event: evt.Event) -> tuple[int, Dataset | None]:
        scp = holder["scp"]
        info: Any = event.action_information
        asked = [
            (str(i.ReferencedSOPClassUID), str(i.ReferencedSOPInstanceUID))
            for i in info.ReferencedSOPSequence
        ]
        transaction = str(info.TransactionUID)
        with lock:
            scp.actions.append((transaction, [uid for _, uid in asked]))
            failed = [a for a in asked if a[1] in scp.fail_once - scp.failed_reported]
            scp.failed_reported |= {uid for _, uid in failed}
        committed = [a for a in asked if a not in failed]
        report = _report(transaction, committed, failed)
        if scp.answer == "same":
            worker = threading.Thread(target=_same, args=(event.assoc, report), daemon=True)
        elif scp.answer == "new":
            worker = threading.Thread(target=_new, args=(scp, report), daemon=True)
        else:
            return 0x0000, None
        threads.append(worker)
        worker.start()
        return 0x0000, None

    def _same(assoc: Any, report: Dataset) -> None:
        time.sleep(0.2)  # after our N-ACTION response
        if assoc.is_established:
            assoc.send_n_event_report(
                report,
                1 if "FailedSOPSequence" not in report else 2,
                StorageCommitmentPushModel,
                StorageCommitmentPushModelInstance,
            )

    def _new(scp: CommitmentSCP, report: Dataset) -> None:
        time.sleep(0.2)
        assert scp.reply_to is not None
        host, port, title = scp.reply_to
        reports = [report]
        if scp.unknown_first:
            reports.insert(0, _report(str(generate_uid()), [], []))
        caller = AE(ae_title=scp.aet)
        caller.add_requested_context(StorageCommitmentPushModel)
        roles = [build_role(StorageCommitmentPushModel)]
        assoc = caller.associate(host, port, ae_title=title, ext_neg=roles)
        if not assoc.is_established:
            scp.report_statuses.append(None)
            return
        for one in reports:
            status, _ = assoc.send_n_event_report(
                one,
                1 if "FailedSOPSequence" not in one else 2,
                StorageCommitmentPushModel,
                StorageCommitmentPushModelInstance,
            )
            scp.report_statuses.append(int(status.Status) if status else None)
        assoc.release()

    with serving_scp(ae, [(evt.EVT_C_STORE, on_store), (evt.EVT_N_ACTION, on_action)]) as port:
        holder["scp"] = CommitmentSCP(
            port=port,
            aet=aet,
            answer=answer,
            reply_to=reply_to,
            fail_once=set(fail_once or ()),
            unknown_first=unknown_first,
        )
        try:
            yield holder["scp"]
        finally:
            for worker in threads:  # reports still on their way, before the server stops
                worker.join(5)


def build_role(uid: str) -> Any:
    """SCP/SCU role selection: we (the requestor of the new association) act as the SCP."""
    from pynetdicom.pdu_primitives import SCP_SCU_RoleSelectionNegotiation

    role = SCP_SCU_RoleSelectionNegotiation()
    role.sop_class_uid = uid
    role.scu_role = False
    role.scp_role = True
    return role
