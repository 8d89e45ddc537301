"""Receivers that record every call: an HTTP server and an SMTP sink on 127.0.0.1.

Notifications are asserted on what arrived, byte for byte, not on what we meant to send.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from email import message_from_bytes, policy
from email.message import EmailMessage
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, cast

from aiosmtpd.controller import Controller

from tests.peers.net import free_port

__all__ = ["HttpCall", "Mail", "recording_http_server", "recording_smtp_sink"]


@dataclass(frozen=True)
class HttpCall:
    method: str
    path: str
    headers: dict[str, str]  # lower-case names
    body: bytes


@dataclass(frozen=True)
class Mail:
    sender: str
    recipients: list[str]
    data: bytes

    @property
    def message(self) -> EmailMessage:
        """The message as a mail client reads it (SMTP's CRLF line ends as newlines)."""
        text = self.data.replace(b"\r\n", b"\n")
        return cast(EmailMessage, message_from_bytes(text, policy=policy.default))


class _Recorder(BaseHTTPRequestHandler):
    calls: list[HttpCall]

    def _record(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        headers = {k.lower(): v for k, v in self.headers.items()}
        self.server.calls.append(HttpCall(self.command, self.path, headers, body))  # type: ignore[attr-defined]
        self.send_response(200)
        self.send_header("Content-Length", "0")
        self.end_headers()

    do_POST = do_PUT = do_GET = _record

    def log_message(self, format: str, *args: Any) -> None:
        pass


@contextmanager
def recording_http_server() -> Iterator[tuple[str, list[HttpCall]]]:
    """``(base URL, calls)``; every request is answered 200 and appended to ``calls``."""
    server = ThreadingHTTPServer(("127.0.0.1", free_port()), _Recorder)
    calls: list[HttpCall] = []
    server.calls = calls  # type: ignore[attr-defined]
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", calls
    finally:
        server.shutdown()
        server.server_close()


class _Sink:
    def __init__(self) -> None:
        self.mails: list[Mail] = []

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        self.mails.append(
            Mail(envelope.mail_from, list(envelope.rcpt_tos), bytes(envelope.original_content))
        )
        return "250 OK"


@contextmanager
def recording_smtp_sink() -> Iterator[tuple[int, list[Mail]]]:
    """``(port, mails)``: an SMTP server on 127.0.0.1 that accepts and keeps every message."""
    sink = _Sink()
    port = free_port()
    controller = Controller(sink, hostname="127.0.0.1", port=port)
    controller.start()
    try:
        yield port, sink.mails
    finally:
        controller.stop()
