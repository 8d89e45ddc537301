"""Our Storage SCP for C-MOVE: the AE a PACS sends the moved objects to.

For the duration of one retrieve it listens with our AE title on the configured address and
port; every received object goes through the retrieve's :class:`~blocks._receiver.Receiver`.
Also the storage SOP classes and transfer syntaxes we accept as a receiver, which C-GET
proposes too. Prefect-free.
"""

from __future__ import annotations

import errno
import logging
import threading
import time
from typing import Any

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
from pynetdicom import StoragePresentationContexts, evt
from pynetdicom.transport import ThreadedAssociationServer

from blocks._association import DicomPeer, make_ae, set_nodelay
from blocks._receiver import Receiver
from blocks.errors import TransientTargetError

__all__ = [
    "MOVE_DRAIN_SECONDS",
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


class MoveSCP:
    """Our Storage SCP for C-MOVE: ``aet`` on ``host:port`` while the ``with`` block runs.

    Only associations addressed to ``aet`` are accepted. If the port is taken (another
    retrieve of this host uses it), waits up to ``port_wait`` seconds for it.
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
        self.host = host
        self.port = port
        self.receiver = receiver
        self.peer = peer
        self.port_wait = port_wait
        self._server: Any = None

    def __enter__(self) -> MoveSCP:
        ae = make_ae(self.peer, self.aet)
        ae.require_called_aet = True
        for uid in STORAGE_CLASSES:
            ae.add_supported_context(uid, RECEIVE_SYNTAXES)
        handlers: list[Any] = [
            (evt.EVT_CONN_OPEN, set_nodelay),
            (evt.EVT_C_STORE, self.receiver.on_c_store),
        ]
        deadline = time.monotonic() + self.port_wait
        logged = False
        while True:
            try:
                server = ae.make_server(
                    (self.host, self.port),
                    evt_handlers=handlers,
                    server_class=ThreadedAssociationServer,
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
            # Our own serving thread: pynetdicom's polls for shutdown every 0.5 s.
            thread = threading.Thread(
                target=server.serve_forever,
                kwargs={"poll_interval": 0.02},
                name=f"move-scp-{self.port}",
                daemon=True,
            )
            thread.start()
            ae._servers.append(server)  # as start_server does (shutdown() removes it)
            self._server = server
            return self

    def drain(self, wanted: int, timeout: float = MOVE_DRAIN_SECONDS) -> None:
        """Wait until ``wanted`` objects arrived and no sub-association is left (or timeout)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            busy = self._server is not None and self._server.active_associations
            if len(self.receiver.instances) + len(self.receiver.rejected) >= wanted and not busy:
                return
            time.sleep(0.02)

    def __exit__(self, *exc: object) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server = None
