"""DICOM+TLS: the client context of a peer and the translation of failed handshakes.

The peer's certificate is verified against the CA file, or, without one, against the system's
CA store *and* for the host name we connect to (any publicly trusted certificate would pass
otherwise); our client certificate is presented,
and a failed handshake is reported with OpenSSL's reason (expired, unknown issuer, ...), never
as a refused connection: pynetdicom only logs the handshake error and reports "not connected",
so the context records it for :func:`tls_failure`. Prefect-free.
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass
from typing import Any

from blocks.errors import PermanentTargetError, TargetError, TransientTargetError, first_line

__all__ = ["TLSContext", "TLSOptions", "tls_failure"]


@dataclass(frozen=True)
class TLSOptions:
    """TLS settings of a DICOM+TLS peer, as file paths (picklable for the worker processes).

    ``ca_cert``: CA certificate(s) the peer's certificate must chain to (PEM; empty: the system
    store, and then the host name is always checked). ``cert``/``key``: our client certificate
    and its unencrypted private key (PEM; empty: none). ``check_hostname``: with a ``ca_cert``,
    also require the certificate to name the host we connect to (DCMTK, and so mercure, does
    not check it).
    """

    ca_cert: str = ""
    cert: str = ""
    key: str = ""
    check_hostname: bool = False

    @property
    def hostname_checked(self) -> bool:
        """Whether the peer's certificate must name its host: always with the system store."""
        return self.check_hostname or not self.ca_cert

    def verification(self) -> str:
        """What a handshake verifies, in words (``targets test`` shows it)."""
        chain = f"ca_cert {self.ca_cert}" if self.ca_cert else "the system CA store"
        host = "host name checked" if self.hostname_checked else "host name not checked"
        return f"certificate verified against {chain}, {host}"

    def context(self) -> TLSContext:
        """A client context; ``PermanentTargetError`` when a file is missing or unusable."""
        context = TLSContext(ssl.PROTOCOL_TLS_CLIENT)
        context.check_hostname = self.hostname_checked
        context.verify_mode = ssl.CERT_REQUIRED
        step = "ca_cert"
        try:
            if self.ca_cert:
                context.load_verify_locations(cafile=self.ca_cert)
            else:
                context.load_default_certs(ssl.Purpose.SERVER_AUTH)
            if self.cert or self.key:
                step = "tls_cert/tls_key"
                context.load_cert_chain(self.cert, self.key or None, password=_no_password)
        except (OSError, ValueError) as exc:
            files = self.ca_cert if step == "ca_cert" else f"{self.cert} / {self.key}"
            reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else exc
            raise PermanentTargetError(f"TLS {step} {files}: {first_line(reason)}") from None
        return context


def _no_password() -> str:
    raise ValueError("the private key is encrypted (only unencrypted keys are supported)")


class _RecordingSSLSocket(ssl.SSLSocket):
    """Keeps the handshake error: pynetdicom logs it and reports only "not connected"."""

    def connect(self, addr: Any) -> None:
        try:
            super().connect(addr)
        except OSError as exc:
            context = self.context
            if isinstance(context, TLSContext):
                context.connect_error = exc
            raise


class TLSContext(ssl.SSLContext):
    """An SSL context that remembers why its last handshake failed (``connect_error``)."""

    sslsocket_class = _RecordingSSLSocket
    connect_error: OSError | None = None


def tls_failure(error: OSError | None, where: str) -> TargetError | None:
    """The TargetError for a failed TLS handshake with ``where``, or None if it was no TLS one."""
    if isinstance(error, ssl.SSLCertVerificationError):
        why = error.verify_message or first_line(error)
        if "expired" in why or "not yet valid" in why:
            hint = "the peer's certificate must be renewed"
        elif "hostname" in why.lower():
            hint = (
                "the certificate does not name this host: connect by a name it holds, or set "
                "ca_cert (the host name is always checked against the system store)"
            )
        else:
            hint = "is it signed by a CA in ca_cert?"
        return PermanentTargetError(
            f"TLS handshake with {where} failed: server certificate not accepted: {why} ({hint})"
        )
    if isinstance(error, ssl.SSLEOFError | ConnectionResetError):
        return TransientTargetError(
            f"TLS handshake with {where} failed: the peer closed the connection "
            "(not a TLS port, or our client certificate was refused?)"
        )
    if isinstance(error, ssl.SSLError):
        why = error.reason or first_line(error)
        return PermanentTargetError(f"TLS handshake with {where} failed: {why}")
    return None
