"""DICOM query/retrieve client on pynetdicom: C-FIND, C-GET, and C-MOVE, given a peer.

mercure retrieves with C-GET only, sends series filters as extra keys of a STUDY-level C-GET
(undefined behaviour at most PACS) and cannot use C-MOVE, which many PACS require. This module is
the Prefect-free DIMSE half of ``DicomTarget.find``/``DicomTarget.retrieve`` (the shared rules
of find and retrieve are ``blocks.qr``'s):

* **Find** runs ``blocks.qr.find_rows`` over C-FIND (study root), all on one association. A
  filter's values are all sent (several joined by ``\\``); the multi-valued ones are checked
  again on every row.
* **Retrieve**: C-GET receives on the same association (SCP role negotiated for every storage
  SOP class); C-MOVE starts our Storage SCP (``blocks._storage_scp``) with our AE title on the
  configured address/port for the duration of the call (a second retrieve needing the same
  port waits for it). Received objects go through ``blocks._receiver``.
* Every wait has a timeout. Errors are the project's tree: ``TransientTargetError`` for refused
  connections, timeouts, aborts, no response and DIMSE "out of resources" (0xA7xx);
  ``PermanentTargetError`` for rejections and failure statuses.
* Optional DCMTK backend (``blocks._dcmtk_qr``).
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal

from pydicom.dataset import Dataset
from pynetdicom import evt
from pynetdicom.association import Association
from pynetdicom.presentation import PresentationContext, build_context, build_role
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    StudyRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelGet,
    StudyRootQueryRetrieveInformationModelMove,
)
from pynetdicom.status import code_to_category

from blocks._association import DicomPeer, association
from blocks._dcmtk_qr import dcmtk_retrieve
from blocks._receiver import Receiver, check_result
from blocks._storage_scp import MOVE_MAX_PDU, RECEIVE_SYNTAXES, STORAGE_CLASSES, MoveSCP
from blocks.errors import PermanentTargetError, TargetError, TransientTargetError
from blocks.qr import (
    Filters,
    Level,
    Progress,
    ReceiveLimits,
    RetrieveItem,
    RetrieveResult,
    check_query,
    find_rows,
    row_from_dataset,
)

__all__ = ["find", "retrieve"]

# Status codes (PS3.4 C.4.2.1.5 / C.4.3.1.4, PS3.7 C).
_PENDING = frozenset({0xFF00, 0xFF01})
_MOVE_DESTINATION_UNKNOWN = 0xA801


def _status_error(peer: DicomPeer, service: str, code: int | None, detail: str = "") -> TargetError:
    """The error for a final DIMSE status that is not success."""
    where = f"{service} at {peer.describe()}"
    if code is None:
        return TransientTargetError(
            f"no {service} response from {peer.describe()} (timeout, abort or lost response)"
        )
    text = f"{where} answered 0x{code:04X} ({code_to_category(code)})"
    if detail:
        text += f": {detail}"
    if code == _MOVE_DESTINATION_UNKNOWN:
        return PermanentTargetError(f"{text}: the peer does not know our move destination AE title")
    if 0xA700 <= code <= 0xA7FF:
        return TransientTargetError(f"{text}: the peer is out of resources")
    return PermanentTargetError(text)


def _status(response: Dataset | None) -> int | None:
    value = response.get("Status") if response is not None else None
    return int(value) if value is not None else None


# --------------------------------------------------------------------------------------------
# C-FIND
# --------------------------------------------------------------------------------------------


def _identifier(
    level: str, keys: Sequence[str], matching: Mapping[str, str | list[str]]
) -> Dataset:
    ds = Dataset()
    ds.QueryRetrieveLevel = level
    for key in keys:
        setattr(ds, key, "")
    for key, value in matching.items():
        setattr(ds, key, "\\".join(value) if isinstance(value, list) else value)
    return ds


@dataclass(frozen=True)
class _CFind:
    """``blocks.qr.RowSource`` over C-FIND on an open association."""

    peer: DicomPeer
    assoc: Association

    def studies(
        self, accession: str, filters: Filters, keys: Sequence[str]
    ) -> list[dict[str, Any]]:
        matching: dict[str, str | list[str]] = {"AccessionNumber": accession, **filters}
        return self._rows(_identifier("STUDY", keys, matching), keys)

    def series(self, study_uid: str, filters: Filters, keys: Sequence[str]) -> list[dict[str, Any]]:
        matching: dict[str, str | list[str]] = {"StudyInstanceUID": study_uid, **filters}
        return self._rows(_identifier("SERIES", keys, matching), keys)

    def _rows(self, identifier: Dataset, keys: Sequence[str]) -> list[dict[str, Any]]:
        found: list[dict[str, Any]] = []
        for response, matched in self.assoc.send_c_find(
            identifier, StudyRootQueryRetrieveInformationModelFind
        ):
            code = _status(response)
            if code in _PENDING:
                if matched is not None:
                    found.append(row_from_dataset(matched, keys))
                continue
            if code == 0x0000:
                return found
            comment = str(response.get("ErrorComment", "")) if response is not None else ""
            raise _status_error(self.peer, "C-FIND", code, comment)
        raise _status_error(self.peer, "C-FIND", None)


def find(
    peer: DicomPeer,
    accession: str,
    filters: Mapping[str, Any] | None = None,
    level: Level = "series",
) -> list[dict[str, Any]]:
    """``blocks.qr.find_rows`` by C-FIND (study root) on one association with ``peer``."""
    accession, wanted = check_query(accession, filters, level)
    with association(peer, [build_context(StudyRootQueryRetrieveInformationModelFind)]) as assoc:
        return find_rows(_CFind(peer, assoc), accession, wanted, level)


def _identifier_of(item: RetrieveItem) -> Dataset:
    """The C-GET/C-MOVE identifier of one request."""
    ds = Dataset()
    ds.QueryRetrieveLevel = "SERIES" if item.series_uid else "STUDY"
    ds.StudyInstanceUID = item.study_uid
    if item.series_uid:
        ds.SeriesInstanceUID = item.series_uid
    return ds


# --------------------------------------------------------------------------------------------
# C-GET and C-MOVE
# --------------------------------------------------------------------------------------------


@dataclass
class _Counters:
    completed: int = 0
    failed: int = 0
    warning: int = 0

    def update(self, response: Dataset) -> None:
        for name, key in (
            ("completed", "NumberOfCompletedSuboperations"),
            ("failed", "NumberOfFailedSuboperations"),
            ("warning", "NumberOfWarningSuboperations"),
        ):
            value = response.get(key)
            if value is not None:
                setattr(self, name, int(value))


def _run_retrieve(
    peer: DicomPeer,
    assoc: Association,
    responses: Iterator[tuple[Dataset, Dataset | None]],
    service: str,
    counters: _Counters,
    receiver: Receiver,
) -> None:
    """Consume the responses of one C-GET/C-MOVE; raise unless the final status is success.

    When the receiver stopped (free space), the association is aborted: the peer stops sending.
    """
    for response, _ in responses:
        if receiver.stopped:
            assoc.abort()
            raise PermanentTargetError(f"{service} from {peer.describe()}: {receiver.stopped}")
        code = _status(response)
        if code is None:
            raise _status_error(peer, service, None)
        counters.update(response)
        if code in _PENDING:
            continue
        if code == 0x0000:
            return
        if code == 0xB000:  # warning: some sub-operations failed; checked by the caller
            return
        if receiver.rejected_count:  # the peer's failure is our refusal: said by the caller
            return
        comment = str(response.get("ErrorComment", "")) if response is not None else ""
        raise _status_error(peer, service, code, comment)
    raise _status_error(peer, service, None)


def _get_contexts() -> tuple[list[PresentationContext], list[Any]]:
    contexts = [build_context(StudyRootQueryRetrieveInformationModelGet)]
    contexts += [build_context(uid, RECEIVE_SYNTAXES) for uid in STORAGE_CLASSES]
    roles = [build_role(uid, scp_role=True) for uid in STORAGE_CLASSES]
    return contexts, roles


def _c_get(peer: DicomPeer, items: Sequence[RetrieveItem], receiver: Receiver) -> _Counters:
    total = _Counters()
    contexts, roles = _get_contexts()
    handlers = [
        (evt.EVT_CONN_OPEN, receiver.on_conn_open),
        (evt.EVT_C_STORE, receiver.on_c_store),
    ]
    if not 0 < peer.max_pdu <= MOVE_MAX_PDU:  # what the peer can make us buffer at once
        peer = replace(peer, max_pdu=MOVE_MAX_PDU)
    with association(peer, contexts, roles=roles, handlers=handlers) as assoc:
        for item in items:
            counters = _Counters()
            responses = assoc.send_c_get(
                _identifier_of(item), StudyRootQueryRetrieveInformationModelGet
            )
            _run_retrieve(peer, assoc, responses, "C-GET", counters, receiver)
            total.completed += counters.completed
            total.failed += counters.failed
            total.warning += counters.warning
    return total


def _c_move(
    peer: DicomPeer,
    items: Sequence[RetrieveItem],
    receiver: Receiver,
    move_aet: str,
    listen: tuple[str, int],
) -> _Counters:
    total = _Counters()
    with MoveSCP(move_aet, listen[0], listen[1], receiver, peer=peer) as scp:
        contexts = [build_context(StudyRootQueryRetrieveInformationModelMove)]
        with association(peer, contexts) as assoc:
            for item in items:
                counters = _Counters()
                responses = assoc.send_c_move(
                    _identifier_of(item), move_aet, StudyRootQueryRetrieveInformationModelMove
                )
                _run_retrieve(peer, assoc, responses, "C-MOVE", counters, receiver)
                total.completed += counters.completed
                total.failed += counters.failed
                total.warning += counters.warning
                scp.drain(total.completed + total.warning)
    return total


# --------------------------------------------------------------------------------------------
# Public entry point
# --------------------------------------------------------------------------------------------


def retrieve(
    peer: DicomPeer,
    items: Sequence[RetrieveItem],
    folder: Path,
    *,
    method: Literal["get", "move"] = "get",
    move_aet: str = "",
    listen: tuple[str, int] = ("127.0.0.1", 11113),
    backend: Literal["pynetdicom", "dcmtk"] = "pynetdicom",
    progress: Progress | None = None,
    limits: ReceiveLimits | None = None,
) -> RetrieveResult:
    """C-GET or C-MOVE ``items`` into ``folder`` (created), as ``<SOPInstanceUID>.dcm``.

    Raises a ``TargetError`` unless the peer reported success, no sub-operation failed, every
    received object passed the checks, and (when the peer's C-FIND gave counts) as many
    instances arrived as were expected. The files that did arrive stay in ``folder`` either way;
    nothing half-received does. ``limits``: see ``blocks._receiver``.
    """
    begin = time.monotonic()
    service = "C-GET" if method == "get" else "C-MOVE"
    if method == "move" and not move_aet:
        raise PermanentTargetError(
            f"{peer.describe()}: C-MOVE needs move_destination_aet (our Storage SCP's AE title)"
        )
    receiver = Receiver.for_items(folder, items, progress, limits)
    try:
        if backend == "dcmtk":
            staging = folder.parent / f".{folder.name}.dcmtk-{os.getpid()}"
            failed = dcmtk_retrieve(peer, items, receiver, method, move_aet, listen, staging)
            counters = _Counters(completed=len(receiver.instances), failed=failed)
        elif method == "get":
            counters = _c_get(peer, items, receiver)
        else:
            counters = _c_move(peer, items, receiver, move_aet, listen)
    finally:
        receiver.discard_partials()
    result = receiver.result(
        service,
        backend,
        completed=counters.completed,
        failed=counters.failed,
        warning=counters.warning,
        elapsed=time.monotonic() - begin,
    )
    return check_result(result, f"{service} from {peer.describe()}")
