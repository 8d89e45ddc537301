"""Our Storage SCP for C-MOVE: the AE a PACS sends the moved objects to.

For the duration of one retrieve it listens with our AE title on the configured address (by
default the local address of the route to the PACS, not every interface) and port; every
received object goes through the retrieve's :class:`~blocks._receiver.Receiver`. It accepts
associations only from the PACS (its addresses, its AE title as calling AE when it has one),
at most :data:`MOVE_MAX_ASSOCIATIONS` at once, with PDUs of at most :data:`MOVE_MAX_PDU` bytes:
a port open during a retrieve is no open door for anyone else.
Also the storage SOP classes and transfer syntaxes we accept as a receiver, which C-GET
proposes too. Prefect-free.
"""

from __future__ import annotations

import errno
import logging
import socket
import threading
import time
from typing import Any, cast

from pydicom.uid import (
    JPEG2000,
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    RLELossless,
)
from pynetdicom import AE, StoragePresentationContexts, evt
from pynetdicom.transport import ThreadedAssociationServer

from blocks._association import DicomPeer, make_ae, set_nodelay
from blocks._receiver import Receiver
from blocks.errors import TransientTargetError

__all__ = [
    "MOVE_DRAIN_SECONDS",
    "MOVE_MAX_ASSOCIATIONS",
    "MOVE_MAX_PDU",
    "MOVE_PORT_WAIT_SECONDS",
    "RECEIVE_SYNTAXES",
    "STORAGE_CLASSES",
    "MoveSCP",
]

LOGGER = logging.getLogger(__name__)

#: Seconds to wait for C-MOVE sub-associations to end after the final C-MOVE response.
MOVE_DRAIN_SECONDS = 10.0
#: Seconds a retrieve waits for the C-MOVE port while another retrieve holds it.
MOVE_PORT_WAIT_SECONDS = 600.0
#: Largest PDU our Storage SCP receives (what one connection can make us buffer at once).
MOVE_MAX_PDU = 1024 * 1024
#: Sub-associations accepted at once (a PACS opens one or a few per C-MOVE).
MOVE_MAX_ASSOCIATIONS = 4
#: Called AE titles that mean "whoever answers": no calling AE title to require of the PACS.
_ANY_AET = {"", "ANY-SCP"}

#: Transfer syntaxes we accept for received objects: uncompressed first (a peer that picks the
#: first it supports sends uncompressed data uncompressed), then the common compressed ones so
#: compressed objects arrive as stored instead of being decompressed by the peer.
RECEIVE_SYNTAXES: list[str | UID] = [
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    JPEG2000Lossless,
    JPEG2000,
    RLELossless,
]
#: Storage SOP classes proposed with SCP role for C-GET (pynetdicom's 120 + the GET model fit
#: in DICOM's 128 presentation contexts).
STORAGE_CLASSES = [str(cx.abstract_syntax) for cx in StoragePresentationContexts]


def route_address(host: str, port: int) -> str:
    """Our local address on the route to ``host`` (no packet is sent: a UDP "connect" only
    picks the route)."""
    try:
        family, _, _, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_DGRAM)[0]
        with socket.socket(family, socket.SOCK_DGRAM) as probe:
            probe.connect(address)
            return str(probe.getsockname()[0])
    except OSError as exc:
        raise TransientTargetError(
            f"cannot find our address on the route to {host}: {exc.strerror or exc}"
        ) from exc


def peer_addresses(host: str) -> frozenset[str]:
    """Every address ``host`` resolves to (where the PACS's sub-associations come from)."""
    try:
        return frozenset(str(info[4][0]) for info in socket.getaddrinfo(host, None))
    except OSError as exc:
        raise TransientTargetError(f"cannot resolve {host}: {exc.strerror or exc}") from exc


class PeerOnlyServer(ThreadedAssociationServer):
    """Closes any connection that does not come from one of ``allowed`` (before a PDU is read).

    Also the storage commitment listener's (``blocks._commitment_scp``); ``role`` names which
    in the log."""

    allowed: frozenset[str] = frozenset()
    role: str = "C-MOVE receiver"

    def verify_request(self, request: Any, client_address: Any) -> bool:
        address = client_address[0] if isinstance(client_address, tuple) else client_address
        if str(address) in self.allowed:
            return True
        LOGGER.warning("%s: connection from %s refused (not the PACS)", self.role, address)
        return False

    def serve_in_thread(self, ae: AE, name: str, poll_interval: float) -> None:
        """Serve from our own daemon thread, registered with ``ae`` as ``start_server`` does
        (so ``ae.shutdown()`` stops it too): pynetdicom's thread polls for shutdown only every
        0.5 s, which a listener opened and closed per retrieve would wait out each time."""
        thread = threading.Thread(
            target=self.serve_forever,
            kwargs={"poll_interval": poll_interval},
            name=name,
            daemon=True,
        )
        thread.start()
        ae._servers.append(self)


class MoveSCP:
    """Our Storage SCP for C-MOVE: ``aet`` on ``host:port`` while the ``with`` block runs.

    ``host`` empty: the local address of the route to the PACS. Only associations addressed to
    ``aet``, from the PACS's addresses, with the PACS's AE title as
    calling AE title (when it has one) are accepted. If the port is taken (another retrieve of
    this host uses it), waits up to ``port_wait`` seconds for it.
    """

    def __init__(
        self,
        aet: str,
        host: str,
        port: int,
        receiver: Receiver,
        *,
        peer: DicomPeer,
        port_wait: float = MOVE_PORT_WAIT_SECONDS,
    ) -> None:
        self.aet = aet
        self.host = host or route_address(peer.host, peer.port)
        self.port = port
        self.receiver = receiver
        self.peer = peer
        self.port_wait = port_wait
        self.allowed = peer_addresses(peer.host)
        self._server: Any = None

    def __enter__(self) -> MoveSCP:
        ae = make_ae(self.peer, self.aet)
        ae.require_called_aet = True
        if self.peer.called_aet not in _ANY_AET:
            ae.require_calling_aet = [self.peer.called_aet]
        ae.maximum_pdu_size = MOVE_MAX_PDU
        ae.maximum_associations = MOVE_MAX_ASSOCIATIONS
        for uid in STORAGE_CLASSES:
            ae.add_supported_context(uid, RECEIVE_SYNTAXES)
        handlers: list[Any] = [
            (evt.EVT_CONN_OPEN, set_nodelay),
            (evt.EVT_CONN_OPEN, self.receiver.on_conn_open),
            (evt.EVT_C_STORE, self.receiver.on_c_store),
        ]
        deadline = time.monotonic() + self.port_wait
        logged = False
        while True:
            try:
                server = ae.make_server(
                    (self.host, self.port),
                    evt_handlers=handlers,
                    server_class=PeerOnlyServer,
                )
            except OSError as exc:
                if exc.errno != errno.EADDRINUSE or time.monotonic() >= deadline:
                    raise TransientTargetError(
                        f"cannot listen for C-MOVE on {self.host}:{self.port}: {exc.strerror}"
                    ) from exc
                if not logged:
                    LOGGER.info("port %d is busy (another C-MOVE?); waiting for it", self.port)
                    logged = True
                time.sleep(0.5)
                continue
            listening = cast(PeerOnlyServer, server)
            listening.allowed = self.allowed
            listening.serve_in_thread(ae, f"move-scp-{self.port}", poll_interval=0.02)
            self._server = server
            return self

    def drain(self, wanted: int, timeout: float = MOVE_DRAIN_SECONDS) -> None:
        """Wait until ``wanted`` objects arrived and no sub-association is left (or timeout)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            busy = self._server is not None and self._server.active_associations
            done = len(self.receiver.instances) + self.receiver.rejected_count
            if (done >= wanted or self.receiver.stopped) and not busy:
                return
            time.sleep(0.02)

    def __exit__(self, *exc: object) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server = None
