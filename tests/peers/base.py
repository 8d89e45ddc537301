"""What every test peer shares: a missing program skips locally but fails on CI (``CI`` set: a
green CI run must have used the real peer), ``with`` that always stops what it started, the
loopback HTTP server behind the in-process stand-ins, and the start of the in-process pynetdicom
SCPs."""

from __future__ import annotations

import os
import shutil
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import TracebackType
from typing import Any, NoReturn

import pytest
from pynetdicom import AE, AllStoragePresentationContexts

__all__ = [
    "ListeningSCP",
    "Peer",
    "missing",
    "require_program",
    "serve_http",
    "serving_scp",
    "stop_http",
    "storage_scp_ae",
]


def missing(message: str) -> NoReturn:
    """Skip the test for a peer this machine lacks; fail it on CI."""
    if os.environ.get("CI"):
        pytest.fail(message)
    pytest.skip(message)


def require_program(name: str, package: str) -> str:
    """The absolute path of program ``name`` (a path, or a name looked up on PATH), or
    :func:`missing` naming the Debian ``package`` to install."""
    if os.sep in name:
        if Path(name).is_file() and os.access(name, os.X_OK):
            return name
    else:
        found = shutil.which(name)
        if found:
            return found
    missing(f"{name} not found (install the Debian package {package!r})")


class Peer:
    """A peer started by ``__enter__`` (in the subclass) and stopped by ``stop`` on leaving
    ``with``, whatever happened inside."""

    def stop(self) -> None:
        raise NotImplementedError

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


def serve_http(handler: type[BaseHTTPRequestHandler], name: str) -> ThreadingHTTPServer:
    """A threading HTTP server for an in-process stand-in, on a free 127.0.0.1 port, already
    serving from a daemon thread; :func:`stop_http` ends it."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, name=name, daemon=True).start()
    return server


def stop_http(server: ThreadingHTTPServer | None) -> None:
    if server is not None:
        server.shutdown()  # returns once serve_forever has returned
        server.server_close()


@dataclass
class ListeningSCP:
    """Where an in-process SCP listens: what a test gives the target that sends to it."""

    port: int
    aet: str


def storage_scp_ae(aet: str, *contexts: str, timeout: float | None = None) -> AE:
    """An AE that accepts a C-STORE of every storage SOP class, and ``contexts`` besides;
    ``timeout`` (DIMSE and network) when a test needs other than pynetdicom's defaults."""
    ae = AE(ae_title=aet)
    for cx in AllStoragePresentationContexts:
        ae.add_supported_context(str(cx.abstract_syntax))
    for uid in contexts:
        ae.add_supported_context(uid)
    if timeout is not None:
        ae.dimse_timeout = timeout
        ae.network_timeout = timeout
    return ae


@contextmanager
def serving_scp(ae: AE, handlers: Sequence[tuple[Any, Any]], port: int = 0) -> Iterator[int]:
    """``ae`` serving on 127.0.0.1 (``port``, or a free one) from its own thread, with its event
    ``handlers``, until the ``with`` block ends; the port it listens on."""
    server: Any = ae.start_server(("127.0.0.1", port), block=False, evt_handlers=list(handlers))
    try:
        yield int(server.server_address[1])
    finally:
        server.shutdown()
