"""What every test peer shares: a missing program skips locally but fails on CI (``CI`` set: a
green CI run must have used the real peer), ``with`` that always stops what it started, and the
loopback HTTP server behind the in-process stand-ins."""

from __future__ import annotations

import os
import shutil
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import TracebackType
from typing import NoReturn

import pytest

__all__ = ["Peer", "missing", "require_program", "serve_http", "stop_http"]


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
