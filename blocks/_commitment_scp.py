"""The listener a PACS sends Storage Commitment answers to on a new association.

Many PACS (Orthanc among them) answer an N-ACTION not on the association that asked but on a
new one, to the AE title and port registered for us. ``serve`` runs this listener while some
DICOM target has ``storage_commitment`` on, on the host's port
(``DICOM_DISPATCH_STORAGE_COMMITMENT_PORT``), bound like the C-MOVE receiver
(``blocks._storage_scp``): on our address on the route to each such target's node (one socket
per distinct address, not every interface), accepting connections from those nodes' addresses
only, associations from their AE titles only (when they have one) and addressed to ours
(``DICOM_DISPATCH_STORAGE_COMMITMENT_AET``, else each target's calling AE title). It accepts
the Storage Commitment Push Model SOP class only, in the SCU role (the PACS acts as the SCP).

An N-EVENT-REPORT names its transaction; the case folder that recorded it (in outgoing/, error/
or success/) gets the answer (``blocks._commitment_record.record_report``); an unknown
transaction is logged and ignored. While it runs, the listener names itself in the data
directory (``blocks._commitment.LISTENER_RECORD``) so this host's senders know an answer on a
new association will be recorded and need not hold their association open for it.
Prefect-free.
"""

from __future__ import annotations

import json
import logging
import os
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

from pydicom import Dataset
from pynetdicom import evt
from pynetdicom.sop_class import StorageCommitmentPushModel  # type: ignore[attr-defined]

from blocks._association import DicomPeer, make_ae, set_nodelay
from blocks._commitment import LISTENER_RECORD, event_info, parse_report
from blocks._commitment_record import find_request, record_report
from blocks._storage_scp import PeerOnlyServer, peer_addresses, route_address
from blocks.errors import TransientTargetError
from blocks.host import data_dir, write_private_file
from tasks.safefiles import read_regular

__all__ = ["CommitmentListener", "ListenRoute"]

LOGGER = logging.getLogger(__name__)

#: Associations served at once (answers are small and quick).
MAX_ASSOCIATIONS = 4
#: Largest PDU accepted (an answer lists UIDs only).
MAX_PDU = 1024 * 1024
#: N-EVENT-REPORT status "processing failure" (PS3.7 C.4): refused, not ours.
_REFUSED = 0x0110
_ANY_AET = {"", "ANY-SCP"}


@dataclass(frozen=True)
class ListenRoute:
    """One target whose node may answer: the node (``peer``: its address and AE title) and
    the AE title it calls us by."""

    peer: DicomPeer
    our_aet: str
    #: The target's name (the senders of this host look for it in the listener's record).
    target: str = ""


class CommitmentListener:
    """The listener on ``port`` for ``routes``; ``folders()`` are where case folders are.

    ``with`` starts and always stops it. Raises ``TransientTargetError`` when a port cannot be
    bound.
    """

    def __init__(
        self,
        port: int,
        routes: Sequence[ListenRoute],
        folders: Callable[[], Sequence[Path]],
        *,
        address: str = "",
    ) -> None:
        self.port = port
        self.routes = list(routes)
        self.folders = folders
        self.address = address
        self.servers: list[Any] = []
        #: Transactions answered through this listener (for the log and the tests).
        self.recorded: list[str] = []
        self.ignored: list[str] = []
        self._lock = threading.Lock()

    def bound(self) -> list[tuple[str, int]]:
        """The (address, port) of each socket listening now."""
        return [(str(s.server_address[0]), int(s.server_address[1])) for s in self.servers]

    def __enter__(self) -> CommitmentListener:
        by_address: dict[str, list[ListenRoute]] = {}
        for route in self.routes:
            where = self.address or route_address(route.peer.host, route.peer.port)
            by_address.setdefault(where, []).append(route)
        try:
            for where, routes in by_address.items():
                self.servers.append(self._serve(where, routes))
        except BaseException:
            self._shutdown()
            raise
        write_private_file(
            data_dir() / LISTENER_RECORD,
            json.dumps(
                {
                    "pid": os.getpid(),
                    "port": self.port,
                    "bound": self.bound(),
                    "targets": sorted({r.target for r in self.routes}),
                }
            ),
        )
        LOGGER.info("storage commitment listener on %s", self.bound())
        return self

    def __exit__(self, *exc: object) -> None:
        record = data_dir() / LISTENER_RECORD
        try:
            if json.loads(read_regular(record, 1 << 20)).get("pid") == os.getpid():
                record.unlink()
        except (OSError, ValueError, AttributeError):
            pass
        self._shutdown()

    def _shutdown(self) -> None:
        for server in self.servers:
            server.shutdown()
        self.servers = []

    def _serve(self, where: str, routes: list[ListenRoute]) -> Any:
        ae = make_ae(routes[0].peer, routes[0].our_aet)
        ae.require_called_aet = False  # several titles may be ours: checked per request
        titles = {r.peer.called_aet for r in routes}
        if not titles & _ANY_AET:
            ae.require_calling_aet = sorted(titles)
        ae.maximum_pdu_size = MAX_PDU
        ae.maximum_associations = MAX_ASSOCIATIONS
        ae.add_supported_context(StorageCommitmentPushModel, scu_role=True, scp_role=True)
        handlers: list[Any] = [
            (evt.EVT_CONN_OPEN, set_nodelay),
            (evt.EVT_N_EVENT_REPORT, self._on_report, [routes]),
        ]
        try:
            server = ae.make_server(
                (where, self.port), evt_handlers=handlers, server_class=PeerOnlyServer
            )
        except OSError as exc:
            raise TransientTargetError(
                f"cannot listen for storage commitment on {where}:{self.port}: {exc.strerror}"
            ) from exc
        allowed: frozenset[str] = frozenset()
        for route in routes:
            allowed |= peer_addresses(route.peer.host)
        listening = cast(PeerOnlyServer, server)
        listening.allowed = allowed
        listening.role = "storage commitment listener"
        listening.serve_in_thread(ae, f"commitment-scp-{self.port}", poll_interval=0.05)
        return server

    def _on_report(self, event: evt.Event, routes: list[ListenRoute]) -> tuple[int, Dataset | None]:
        requestor: Any = event.assoc.requestor
        called = str(requestor.primitive.called_ae_title).strip()
        calling = str(requestor.ae_title).strip()
        address = str(requestor.address)
        known = any(
            called == r.our_aet
            and (r.peer.called_aet in _ANY_AET or calling == r.peer.called_aet)
            and address in peer_addresses(r.peer.host)
            for r in routes
        )
        if not known:
            LOGGER.warning(
                "storage commitment answer from %s (%s -> %s) refused: no such target",
                address,
                calling,
                called,
            )
            return _REFUSED, None
        report = parse_report(event_info(event), "listener")
        uid = report.transaction_uid if report is not None else ""
        case = find_request(self.folders(), uid) if report is not None else None
        if report is None or case is None or not record_report(case, report):
            LOGGER.warning(
                "storage commitment answer from %s for transaction %s ignored: unknown or "
                "answered already",
                calling,
                uid or "(none)",
            )
            with self._lock:
                self.ignored.append(uid)
            return 0x0000, None
        LOGGER.info(
            "storage commitment answer for %s: %d committed, %d failed (case %s)",
            uid,
            len(report.committed),
            len(report.failed),
            case.name,
        )
        with self._lock:
            self.recorded.append(uid)
        return 0x0000, None
