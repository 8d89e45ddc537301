"""DICOM C-STORE and C-ECHO client on pynetdicom: the sending half of a DICOM target.

mercure shells out to DCMTK ``dcmsend`` once per case; this module does the same job in-process
so that per-instance DIMSE statuses come back as data (``StoreResult``) instead of a text report
to parse, and so the Prefect layer can decide what is worth a retry. It is Prefect-free on
purpose: it is exercised directly against real peers in the tests.

What it does, and why:

* One association per call (per association slot) carries all files: association set-up costs
  far more than a C-STORE of a small image.
* Presentation contexts come from the files' headers only (file meta), one per
  (SOP class, transfer syntax) pair: the file's own transfer syntax, plus Explicit/Implicit VR
  Little Endian for uncompressed little-endian files, so a peer that only takes implicit VR still
  receives them. DICOM allows 128 contexts per association; more pairs are split over
  consecutive associations.
* Files are streamed from disk without decoding (pynetdicom's chunked C-STORE) whenever the peer
  accepted the file's own transfer syntax; only an uncompressed file the peer wants in another
  uncompressed syntax is read fully and re-encoded by pynetdicom (pixel data is never decoded).
* ``TCP_NODELAY`` is set on every association socket: with Nagle on, each C-STORE waits ≈ 40 ms
  for the peer's delayed ACK (measured: 0.24 s vs 0.9-10 s for 200 CT images).
* ``associations > 1`` sends in parallel in separate *processes* (pure-Python PDU encoding holds
  the GIL, so threads do not help). It only pays off against peers that serve associations
  concurrently (DCMTK storescp does not, unless started with ``--fork``). The processes come
  from a forkserver, which imports the caller's ``__main__`` once per worker: scripts need the
  usual ``if __name__ == "__main__":`` guard.
* ``tls=TLSOptions(...)`` runs the same associations over TLS (DICOM+TLS targets): the peer's
  certificate is verified against the CA file, our client certificate is presented, and a
  failed handshake is reported with OpenSSL's reason (expired, unknown issuer, ...), never as a
  refused connection.
* A missing response (timeout, abort, or pynetdicom 3.0.4 losing it) is recorded as
  ``status=None`` -- never as sent -- the association is aborted and the remaining files go on a
  new association. ``store_files`` raises only when no association could be made at all.
"""

from __future__ import annotations

import logging
import multiprocessing
import queue
import socket
import ssl
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field, replace
from datetime import datetime
from pathlib import Path
from typing import Any

import pynetdicom
from pydicom import dcmread
from pydicom.uid import (
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
)
from pynetdicom import AE, _config, evt
from pynetdicom.dsutils import split_dataset
from pynetdicom.pdu_primitives import A_ASSOCIATE
from pynetdicom.presentation import PresentationContext, build_context
from pynetdicom.status import code_to_category

from blocks.errors import PermanentTargetError, TargetError, TransientTargetError, first_line

__all__ = [
    "MAX_CONTEXTS",
    "MAX_STALLED_ASSOCIATIONS",
    "REACTOR_RACE_FIXED",
    "EchoResult",
    "InstanceResult",
    "StoreResult",
    "TLSOptions",
    "echo",
    "shutdown_workers",
    "status_category",
    "status_text",
    "store_files",
    "tcp_reachable",
]

LOGGER = logging.getLogger(__name__)

#: DICOM limit: presentation context IDs are odd numbers 1..255.
MAX_CONTEXTS = 128
_ASSOCIATION_LOST = "association lost before the C-STORE request was sent"
#: Give up on the rest of a slot after this many associations in a row lost their first response.
MAX_STALLED_ASSOCIATIONS = 3

# Identifiers of C-FIND/C-MOVE requests and responses carry patient data: keep them out of logs.
_config.LOG_REQUEST_IDENTIFIERS = False
_config.LOG_RESPONSE_IDENTIFIERS = False
# send_c_store(<path>) streams the dataset bytes from the file instead of decoding the file.
# Needs an accepted context with the file's own transfer syntax; other cases pass a Dataset.
_config.STORE_SEND_CHUNKED_DATASET = True

_VERIFICATION = UID("1.2.840.10008.1.1")
_LITTLE_ENDIAN_UNCOMPRESSED = frozenset(
    {ExplicitVRLittleEndian, ImplicitVRLittleEndian, DeflatedExplicitVRLittleEndian}
)


# --------------------------------------------------------------------------------------------
# pynetdicom 3.0.4 reactor race (lost C-STORE responses)
# --------------------------------------------------------------------------------------------

_PATCH_MARK = "_dicom_dispatch_reactor_fix"


def _patch_reactor_race() -> bool:
    """Stop the association reactor from stealing responses meant for ``send_*()``.

    In pynetdicom 3.0.4 ``Association._run_reactor()`` sets ``_is_paused = True``, leaves
    ``_reactor_checkpoint.wait()``, sets ``_is_paused = False`` and calls
    ``dimse.get_msg(block=False)``. ``send_c_store()`` clears the checkpoint and spins until
    ``_is_paused`` is true; if it reads true inside that window, both proceed and the reactor can
    take the C-STORE response off the queue ("Received unexpected C-STORE service message"), so
    ``send_c_store()`` hits its DIMSE timeout and returns an empty status (pydicom/pynetdicom
    #842, #850, #875; measured here in 20 of 180 sends).

    Fix: the reactor's *non-blocking* ``get_msg`` returns nothing while the checkpoint is cleared
    (a ``send_*()`` owns the queue then). A message taken just before the checkpoint was cleared
    is put back at the head of the queue, so the waiting ``send_*()`` still gets it. Blocking
    calls (the ``send_*()`` side) are unchanged. Idempotent; applied only to 3.0.4, the version
    this was analysed on. Returns whether the patch is in place.
    """
    from pynetdicom.dimse import DIMSEServiceProvider

    current = DIMSEServiceProvider.get_msg
    if getattr(current, _PATCH_MARK, False):
        return True
    if pynetdicom.__version__ != "3.0.4":
        LOGGER.warning(
            "pynetdicom %s is not 3.0.4: reactor race fix not applied, check upstream #842",
            pynetdicom.__version__,
        )
        return False
    original: Callable[..., Any] = current

    def get_msg(self: Any, block: bool = False) -> tuple[int | None, Any]:
        if block:
            result: tuple[int | None, Any] = original(self, block=True)
            return result
        checkpoint = self.assoc._reactor_checkpoint
        if not checkpoint.is_set():
            return None, None
        msg_queue: queue.Queue[Any] = self.msg_queue
        try:
            item = msg_queue.get(block=False)
        except queue.Empty:
            return None, None
        if not checkpoint.is_set():
            # A send_*() paused the reactor while we took this: it is that call's response.
            with msg_queue.mutex:
                msg_queue.queue.appendleft(item)
                msg_queue.not_empty.notify()
            return None, None
        return item  # type: ignore[no-any-return]

    setattr(get_msg, _PATCH_MARK, True)
    get_msg.__doc__ = original.__doc__
    DIMSEServiceProvider.get_msg = get_msg  # type: ignore[method-assign,assignment]
    return True


REACTOR_RACE_FIXED = _patch_reactor_race()


# --------------------------------------------------------------------------------------------
# Results
# --------------------------------------------------------------------------------------------


def status_category(code: int | None) -> str:
    """``"success"``, ``"warning"``, ``"failure"`` or ``"none"`` (no response) for a status.

    Pending, cancel and unknown codes count as failure: for a C-STORE none of them means the
    instance was stored.
    """
    if code is None:
        return "none"
    category = code_to_category(code)
    if category == "Success":
        return "success"
    if category == "Warning":
        return "warning"
    return "failure"


def status_text(code: int | None) -> str:
    """Short text for messages and logs: ``"0xA700 (failure)"``, or ``"no response"``."""
    if code is None:
        return "no response"
    return f"0x{code:04X} ({status_category(code)})"


@dataclass(frozen=True)
class InstanceResult:
    """What happened to one file.

    ``status`` is the DIMSE status of the C-STORE response, or ``None`` when there is none: not
    sent (``error`` says why), or sent but no response came (timeout, abort, lost response).
    ``None`` never means stored.
    """

    path: Path
    sop_class_uid: str
    sop_instance_uid: str
    transfer_syntax: str
    size: int
    status: int | None
    association: int
    context_id: int | None
    network_transfer_syntax: str | None
    error: str | None
    #: The peer accepted no presentation context this instance could be sent on.
    no_context: bool = False
    #: The C-STORE request went out (``status`` may still be ``None``: no response).
    request_sent: bool = False

    @property
    def category(self) -> str:
        """``status_category(self.status)``."""
        return status_category(self.status)

    def ok(self, warnings_ok: bool = True) -> bool:
        """Stored: success, or a warning when ``warnings_ok``."""
        category = self.category
        return category == "success" or (warnings_ok and category == "warning")


@dataclass
class StoreResult:
    """Outcome of one ``store_files`` call: per-instance statuses, in the order of the files."""

    peer: str
    calling_aet: str
    called_aet: str
    started: datetime
    instances: list[InstanceResult]
    associations: int
    #: Presentation contexts proposed, summed over all associations (dcmsend's counter).
    presentation_contexts: int = 0
    #: Wall time of the call in seconds.
    elapsed: float = 0.0

    def accepted(self, warnings_ok: bool = True) -> bool:
        """Every instance stored (success, or warning when ``warnings_ok``)."""
        return all(i.ok(warnings_ok) for i in self.instances)

    def failed(self, warnings_ok: bool = True) -> list[InstanceResult]:
        """Instances not stored: failure status, no response, or not sent."""
        return [i for i in self.instances if not i.ok(warnings_ok)]

    def counts(self) -> dict[str, int]:
        """Number of instances per ``status_category``."""
        out = {"success": 0, "warning": 0, "failure": 0, "none": 0}
        for instance in self.instances:
            out[instance.category] += 1
        return out


@dataclass(frozen=True)
class EchoResult:
    """C-ECHO outcome; truthy when the peer answered 0x0000."""

    ok: bool
    status: int | None
    detail: str

    def __bool__(self) -> bool:
        return self.ok


# --------------------------------------------------------------------------------------------
# Internals shared by the serial sender and the worker processes (must stay picklable)
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TLSOptions:
    """TLS settings of a DICOM+TLS peer, as file paths (picklable for the worker processes).

    ``ca_cert``: CA certificate(s) the peer's certificate must chain to (PEM; empty: the system
    store). ``cert``/``key``: our client certificate and its unencrypted private key (PEM; empty:
    none). ``check_hostname``: also require the certificate to name the host we connect to
    (DCMTK, and so mercure, does not check it).
    """

    ca_cert: str = ""
    cert: str = ""
    key: str = ""
    check_hostname: bool = False

    def context(self) -> _TLSContext:
        """A client context; ``PermanentTargetError`` when a file is missing or unusable."""
        context = _TLSContext(ssl.PROTOCOL_TLS_CLIENT)
        context.check_hostname = self.check_hostname
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
            if isinstance(context, _TLSContext):
                context.connect_error = exc
            raise


class _TLSContext(ssl.SSLContext):
    sslsocket_class = _RecordingSSLSocket
    connect_error: OSError | None = None


def _tls_failure(error: OSError | None, target: _Target) -> TargetError | None:
    """The TargetError for a failed TLS handshake, or None when it was no TLS problem."""
    if isinstance(error, ssl.SSLCertVerificationError):
        why = error.verify_message or first_line(error)
        if "expired" in why or "not yet valid" in why:
            hint = "the peer's certificate must be renewed"
        elif "hostname" in why.lower():
            hint = "the certificate does not name this host: see tls_check_hostname"
        else:
            hint = "is it signed by a CA in ca_cert?"
        return PermanentTargetError(
            f"TLS handshake with {target.describe()} failed: server certificate not accepted: "
            f"{why} ({hint})"
        )
    if isinstance(error, ssl.SSLEOFError | ConnectionResetError):
        return TransientTargetError(
            f"TLS handshake with {target.describe()} failed: the peer closed the connection "
            "(not a TLS port, or our client certificate was refused?)"
        )
    if isinstance(error, ssl.SSLError):
        why = error.reason or first_line(error)
        return PermanentTargetError(f"TLS handshake with {target.describe()} failed: {why}")
    return None


@dataclass(frozen=True)
class _Target:
    host: str
    port: int
    called_aet: str
    calling_aet: str
    tls: TLSOptions | None = None

    @property
    def peer(self) -> str:
        return f"{self.host}:{self.port}"

    def describe(self) -> str:
        over = " over TLS" if self.tls is not None else ""
        return f"{self.peer}{over} ({self.calling_aet} -> {self.called_aet})"


@dataclass(frozen=True)
class _Options:
    connect_timeout: float
    acse_timeout: float
    dimse_timeout: float
    network_timeout: float
    max_pdu: int


@dataclass(frozen=True)
class _FileInfo:
    index: int
    path: Path
    sop_class_uid: str
    sop_instance_uid: str
    transfer_syntax: str
    size: int

    @property
    def key(self) -> tuple[str, str]:
        return self.sop_class_uid, self.transfer_syntax

    def result(self, **kwargs: Any) -> InstanceResult:
        values: dict[str, Any] = {
            "status": None,
            "association": 0,
            "context_id": None,
            "network_transfer_syntax": None,
            "error": None,
        }
        values.update(kwargs)
        return InstanceResult(
            path=self.path,
            sop_class_uid=self.sop_class_uid,
            sop_instance_uid=self.sop_instance_uid,
            transfer_syntax=self.transfer_syntax,
            size=self.size,
            **values,
        )


@dataclass
class _SlotResult:
    results: dict[int, InstanceResult] = field(default_factory=dict)
    associations: int = 0
    contexts: int = 0


def _inspect(index: int, path: Path) -> _FileInfo | InstanceResult:
    """Read the file meta only (SOP class/instance, transfer syntax, dataset size)."""
    try:
        meta, offset = split_dataset(path)
        sop_class = str(meta.MediaStorageSOPClassUID)
        sop_instance = str(meta.MediaStorageSOPInstanceUID)
        syntax = str(meta.TransferSyntaxUID)
        size = path.stat().st_size - offset
    except Exception as exc:  # unreadable, not DICOM, no file meta: a per-file outcome
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        return InstanceResult(
            path=path,
            sop_class_uid="",
            sop_instance_uid="",
            transfer_syntax="",
            size=0,
            status=None,
            association=0,
            context_id=None,
            network_transfer_syntax=None,
            error=f"unreadable DICOM file: {reason}",
        )
    return _FileInfo(index, path, sop_class, sop_instance, syntax, size)


def _proposed_syntaxes(transfer_syntax: str) -> list[str]:
    """The file's own syntax first, plus the lossless re-encodings pynetdicom can do."""
    syntaxes = [transfer_syntax]
    if UID(transfer_syntax) in _LITTLE_ENDIAN_UNCOMPRESSED:
        syntaxes += [
            s for s in (ExplicitVRLittleEndian, ImplicitVRLittleEndian) if s != transfer_syntax
        ]
    return syntaxes


def _context_batch(pending: Sequence[_FileInfo]) -> tuple[list[_FileInfo], list[tuple[str, str]]]:
    """Files for the next association: those whose context is among the first 128 needed."""
    keys: list[tuple[str, str]] = []
    chosen: set[tuple[str, str]] = set()
    for info in pending:
        if info.key not in chosen and len(keys) < MAX_CONTEXTS:
            chosen.add(info.key)
            keys.append(info.key)
    return [i for i in pending if i.key in chosen], keys


def _set_nodelay(event: evt.Event) -> None:
    """EVT_CONN_OPEN handler: disable Nagle on the association's socket (see module doc)."""
    wrapper = event.assoc.dul.socket
    sock: socket.socket | None = wrapper.socket if wrapper is not None else None
    if sock is not None:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def _make_ae(target: _Target, options: _Options) -> AE:
    ae = AE(ae_title=target.calling_aet)
    ae.connection_timeout = options.connect_timeout
    ae.acse_timeout = options.acse_timeout
    ae.dimse_timeout = options.dimse_timeout
    ae.network_timeout = options.network_timeout
    ae.maximum_pdu_size = options.max_pdu
    return ae


def _unread_rejection(assoc: Any) -> Any:
    """An A-ASSOCIATE-RJ the peer sent but pynetdicom never read, or None.

    A peer that rejects and closes at once (storescp ``--refuse``) can make pynetdicom 3.0.4's
    DUL thread process the rejection *and* the closed connection before the requesting thread
    checks ``_is_connected``; it then aborts instead of reading the answer, and the rejection
    would look like a network failure (transient) instead of what it is (permanent).
    """
    try:
        pending = list(assoc.dul.to_user_queue.queue)
    except AttributeError:
        return None
    for primitive in pending:
        if isinstance(primitive, A_ASSOCIATE) and primitive.result in (0x01, 0x02):
            return primitive
    return None


def association_answer(assoc: Any, peer: str) -> Any:
    """The peer's A-ASSOCIATE answer (None if there was none); a rejection is raised.

    The rejection is read even when pynetdicom reported an abort because the peer closed the
    connection right after rejecting. Rejected "transient" (e.g. too many associations) is a
    TransientTargetError, "permanent" a PermanentTargetError.
    """
    answer = getattr(assoc.acceptor, "primitive", None) or _unread_rejection(assoc)
    result = getattr(answer, "result", None)
    if answer is not None and result in (0x01, 0x02):
        reason = f"{answer.result_str}, source: {answer.source_str}, reason: {answer.reason_str}"
        error_type = TransientTargetError if result == 0x02 else PermanentTargetError
        raise error_type(f"association rejected by {peer}: {reason}")
    return answer


def _associate(
    ae: AE, target: _Target, options: _Options, contexts: list[PresentationContext]
) -> Any:
    """Open an association or raise the matching TargetError.

    Returns the pynetdicom Association when established, or when the peer accepted the
    association but none of the contexts (pynetdicom then aborts it; the caller records the
    instances as having no context). Rejections by the peer with result "permanent" raise
    PermanentTargetError, "transient" rejections (congestion, local limit) TransientTargetError.
    """
    connected = threading.Event()

    def on_open(event: evt.Event) -> None:
        connected.set()

    tls = target.tls.context() if target.tls is not None else None
    started = time.monotonic()
    try:
        assoc = ae.associate(
            target.host,
            target.port,
            contexts=contexts,
            ae_title=target.called_aet,
            max_pdu=options.max_pdu,
            evt_handlers=[(evt.EVT_CONN_OPEN, _set_nodelay), (evt.EVT_CONN_OPEN, on_open)],
            tls_args=(tls, target.host) if tls is not None else None,
        )
    except OSError as exc:  # name resolution and the like
        raise TransientTargetError(f"cannot reach {target.describe()}: {exc}") from exc
    if tls is not None and not connected.is_set():
        failure = _tls_failure(tls.connect_error, target)
        if failure is not None:
            raise failure
    if assoc.is_established:
        return assoc
    answer = association_answer(assoc, target.describe())
    if (
        getattr(answer, "result", None) == 0x00
    ):  # A-ASSOCIATE-AC without any accepted presentation context
        return assoc
    elapsed = time.monotonic() - started
    if not connected.is_set():
        if elapsed >= options.connect_timeout - 0.05:
            why = f"no TCP connection within {options.connect_timeout:g} s"
        else:
            why = "TCP connection refused"
    elif answer is None and elapsed >= options.acse_timeout - 0.05:
        why = f"no answer to the association request within {options.acse_timeout:g} s"
    else:
        why = "association aborted during negotiation"
        if target.tls is not None:
            why += " (did the peer refuse our client certificate? check tls_cert/tls_key)"
    raise TransientTargetError(f"cannot associate with {target.describe()}: {why}")


def _send_one(assoc: Any, info: _FileInfo, number: int, msg_id: int) -> InstanceResult:
    """One C-STORE on an established association; never raises."""
    same = [cx for cx in assoc.accepted_contexts if cx.abstract_syntax == info.sop_class_uid]
    exact = [cx for cx in same if cx.transfer_syntax[0] == info.transfer_syntax]
    convertible = (
        [cx for cx in same if UID(cx.transfer_syntax[0]) in _LITTLE_ENDIAN_UNCOMPRESSED]
        if UID(info.transfer_syntax) in _LITTLE_ENDIAN_UNCOMPRESSED
        else []
    )
    if not exact and not convertible:
        return info.result(
            association=number,
            no_context=True,
            error=f"no accepted presentation context for {UID(info.sop_class_uid).name} "
            f"in {UID(info.transfer_syntax).name}",
        )
    context = exact[0] if exact else convertible[0]
    sent = {
        "association": number,
        "context_id": context.context_id,
        "network_transfer_syntax": str(context.transfer_syntax[0]),
    }
    try:
        # A path is streamed from the file (chunked); a Dataset is re-encoded by pynetdicom.
        payload: Any = info.path if exact else dcmread(info.path)
        response = assoc.send_c_store(payload, msg_id=msg_id)
    except RuntimeError:  # association gone between two C-STOREs (peer abort, network)
        return info.result(**sent, error=_ASSOCIATION_LOST)
    except Exception as exc:  # unreadable file, encoding error: this file's outcome only
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        return info.result(**sent, error=f"cannot send: {reason}")
    status = response.get("Status") if response is not None else None
    if status is None:
        why = (
            "association aborted while waiting for the C-STORE response"
            if assoc.is_aborted or assoc.acse.is_aborted()
            else "no C-STORE response (DIMSE timeout or lost response)"
        )
        return info.result(**sent, request_sent=True, error=why)
    return info.result(**sent, request_sent=True, status=int(status))


def _store_serial(
    paths: Sequence[tuple[int, Path]], target: _Target, options: _Options
) -> _SlotResult:
    """Send ``paths`` over as few associations as possible, one after the other."""
    out = _SlotResult()
    pending: list[_FileInfo] = []
    for index, path in paths:
        inspected = _inspect(index, path)
        if isinstance(inspected, InstanceResult):
            out.results[index] = inspected
        else:
            pending.append(inspected)
    ae = _make_ae(target, options)
    stalled = 0
    while pending:
        batch, keys = _context_batch(pending)
        contexts = [build_context(sop, _proposed_syntaxes(ts)) for sop, ts in keys]
        try:
            assoc = _associate(ae, target, options, contexts)
        except TargetError as exc:
            if out.associations == 0:
                raise
            LOGGER.warning("Giving up on %d instances: %s", len(pending), exc)
            for info in pending:
                out.results[info.index] = info.result(error=str(exc))
            break
        out.associations += 1
        out.contexts += len(contexts)
        number = out.associations
        answered = lost = 0
        no_contexts = not assoc.is_established  # A-ASSOCIATE-AC, but every context rejected
        for msg_id, info in enumerate(batch):
            if no_contexts:
                result = info.result(
                    association=number,
                    no_context=True,
                    error="the peer accepted none of the proposed presentation contexts",
                )
            elif not assoc.is_established:
                result = info.result(error=_ASSOCIATION_LOST)
            else:
                result = _send_one(assoc, info, number, msg_id % 0xFFFF + 1)
            if result.error == _ASSOCIATION_LOST:
                lost += 1  # not sent: stays pending for the next association
                break
            out.results[info.index] = result
            if result.request_sent and result.status is None:
                lost += 1
                LOGGER.warning(
                    "No C-STORE response from %s on association %d (%s); continuing on a new "
                    "association",
                    target.describe(),
                    number,
                    result.error,
                )
                break
            if result.status is not None:
                answered += 1
        if assoc.is_established:
            if lost:
                assoc.abort()
            else:
                assoc.release()
        pending = [i for i in pending if i.index not in out.results]
        stalled = stalled + 1 if (lost and not answered) else 0
        if pending and stalled >= MAX_STALLED_ASSOCIATIONS:
            reason = f"gave up: {stalled} associations in a row without a C-STORE response"
            LOGGER.warning("%s: %s", target.describe(), reason)
            for info in pending:
                out.results[info.index] = info.result(error=reason)
            break
    return out


def _store_slot(
    paths: Sequence[tuple[int, Path]], target: _Target, options: _Options
) -> _SlotResult | TargetError:
    """Worker-process entry point: errors come back as values, so every slot is merged."""
    try:
        return _store_serial(paths, target, options)
    except TargetError as exc:
        return exc


_POOL_LOCK = threading.Lock()
_POOL: ProcessPoolExecutor | None = None
_POOL_SIZE = 0


def _worker_pool(workers: int) -> ProcessPoolExecutor:
    """The shared pool of sender processes, grown to at least ``workers``.

    Processes come from a forkserver with this module preloaded: ``fork`` straight from a
    process running threads (Prefect's, pynetdicom's) can deadlock the child, and a fresh
    interpreter per call costs ≈ 0.35 s of imports. The pool lives as long as the parent, so
    only the first parallel call pays for starting it. Like every non-fork start method, it
    imports the parent's ``__main__`` once per worker: scripts need the usual
    ``if __name__ == "__main__":`` guard.
    """
    global _POOL, _POOL_SIZE
    with _POOL_LOCK:
        if _POOL is None or _POOL_SIZE < workers:
            if _POOL is not None:
                _POOL.shutdown(wait=False)
            context = multiprocessing.get_context("forkserver")
            context.set_forkserver_preload([__name__])
            _POOL = ProcessPoolExecutor(max_workers=workers, mp_context=context)
            _POOL_SIZE = workers
        return _POOL


def shutdown_workers() -> None:
    """Stop the sender processes (they are restarted on the next parallel send)."""
    global _POOL, _POOL_SIZE
    with _POOL_LOCK:
        if _POOL is not None:
            _POOL.shutdown(wait=True, cancel_futures=True)
        _POOL, _POOL_SIZE = None, 0


def _forget_pool(pool: ProcessPoolExecutor) -> None:
    global _POOL, _POOL_SIZE
    with _POOL_LOCK:
        if _POOL is pool:
            _POOL, _POOL_SIZE = None, 0
    pool.shutdown(wait=False, cancel_futures=True)


def _store_parallel(
    shares: Sequence[Sequence[tuple[int, Path]]], target: _Target, options: _Options
) -> list[_SlotResult | TargetError]:
    """Run one slot per share in the worker processes; one retry if a worker died."""
    for attempt in (1, 2):
        pool = _worker_pool(len(shares))
        try:
            futures = [pool.submit(_store_slot, share, target, options) for share in shares]
            return [f.result() for f in futures]
        except BrokenProcessPool:
            _forget_pool(pool)
            if attempt == 2:
                raise
            LOGGER.warning("A sender process died; restarting the pool and sending again")
    raise AssertionError("unreachable")


def _skip_stored(files: Sequence[Path], earlier: StoreResult, warnings_ok: bool) -> list[Path]:
    stored = {Path(i.path) for i in earlier.instances if i.ok(warnings_ok)}
    return [p for p in files if Path(p) not in stored]


# --------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------


def store_files(
    files: Sequence[Path],
    host: str,
    port: int,
    called_aet: str,
    calling_aet: str,
    *,
    connect_timeout: float = 10,
    acse_timeout: float = 30,
    dimse_timeout: float = 60,
    network_timeout: float = 60,
    max_pdu: int = 0,
    associations: int = 1,
    only_failed_of: StoreResult | None = None,
    warnings_ok: bool = True,
    tls: TLSOptions | None = None,
) -> StoreResult:
    """C-STORE ``files`` to ``called_aet`` at ``host:port``; statuses are returned, not raised.

    ``associations > 1`` splits the files round-robin over that many parallel associations, each
    in its own process, and merges the results (association numbers are renumbered 1..n over
    all). ``only_failed_of`` re-sends only the files that an earlier result did not record as
    stored (``warnings_ok`` decides whether a warning counted as stored); the returned result
    then covers just those files. ``tls`` sends over TLS (see :class:`TLSOptions`). Raises
    ``TransientTargetError`` (connection refused, timeout, abort, transient rejection) or
    ``PermanentTargetError`` (permanent A-ASSOCIATE-RJ, failed TLS handshake, unusable TLS
    files) only when no association at all could be made.
    """
    begin = time.monotonic()
    started = datetime.now().astimezone()
    target = _Target(host, int(port), called_aet, calling_aet, tls)
    options = _Options(
        float(connect_timeout),
        float(acse_timeout),
        float(dimse_timeout),
        float(network_timeout),
        int(max_pdu),
    )
    paths = [Path(p) for p in files]
    if only_failed_of is not None:
        paths = _skip_stored(paths, only_failed_of, warnings_ok)
    indexed = list(enumerate(paths))
    slots = max(1, min(int(associations), len(indexed)))
    if slots == 1:
        outcomes: list[_SlotResult | TargetError] = [_store_serial(indexed, target, options)]
        shares = [indexed]
    else:
        shares = [indexed[k::slots] for k in range(slots)]
        outcomes = _store_parallel(shares, target, options)
    errors = [o for o in outcomes if isinstance(o, TargetError)]
    if errors and len(errors) == len(outcomes):
        raise errors[0]
    merged: dict[int, InstanceResult] = {}
    total_associations = total_contexts = 0
    for share, outcome in zip(shares, outcomes, strict=True):
        if isinstance(outcome, TargetError):
            for index, path in share:
                inspected = _inspect(index, path)
                merged[index] = (
                    inspected
                    if isinstance(inspected, InstanceResult)
                    else inspected.result(error=str(outcome))
                )
            continue
        offset = total_associations
        for index, instance in outcome.results.items():
            if offset and instance.association:
                instance = replace(instance, association=instance.association + offset)
            merged[index] = instance
        total_associations += outcome.associations
        total_contexts += outcome.contexts
    result = StoreResult(
        peer=target.peer,
        calling_aet=calling_aet,
        called_aet=called_aet,
        started=started,
        instances=[merged[i] for i in range(len(paths))],
        associations=total_associations,
        presentation_contexts=total_contexts,
        elapsed=time.monotonic() - begin,
    )
    counts = result.counts()
    LOGGER.info(
        "C-STORE to %s: %d instances in %.2f s over %d associations: %d success, %d warning, "
        "%d failure, %d without response",
        target.describe(),
        len(paths),
        result.elapsed,
        total_associations,
        counts["success"],
        counts["warning"],
        counts["failure"],
        counts["none"],
    )
    return result


def tcp_reachable(host: str, port: int, timeout: float = 5) -> bool:
    """Whether a TCP connection to ``host:port`` opens: mercure's "ping", without ICMP."""
    try:
        with socket.create_connection((host, int(port)), timeout=timeout):
            return True
    except OSError:
        return False


def echo(
    host: str,
    port: int,
    called_aet: str,
    calling_aet: str,
    *,
    timeout: float = 5,
    tls: TLSOptions | None = None,
) -> EchoResult:
    """C-ECHO the peer (mercure's connection test); never raises for network problems.

    ``tls`` echoes over TLS; an unusable TLS file or a failed handshake is a failed echo whose
    ``detail`` says why.
    """
    target = _Target(host, int(port), called_aet, calling_aet, tls)
    options = _Options(timeout, timeout, timeout, timeout, 0)
    ae = _make_ae(target, options)
    try:
        assoc = _associate(ae, target, options, [build_context(_VERIFICATION)])
    except TargetError as exc:
        return EchoResult(False, None, str(exc))
    if not assoc.is_established:
        return EchoResult(False, None, f"{target.describe()} does not accept Verification")
    try:
        response = assoc.send_c_echo()
    finally:
        if assoc.is_established:
            assoc.release()
    status = response.get("Status") if response is not None else None
    if status is None:
        return EchoResult(False, None, f"no C-ECHO response from {target.describe()}")
    code = int(status)
    return EchoResult(code == 0x0000, code, f"C-ECHO status 0x{code:04X} from {target.describe()}")
