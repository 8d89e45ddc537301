"""mercure's DICOM target (C-STORE), sent with DCMTK ``dcmsend`` or pynetdicom.

``backend="auto"`` (the default) picks ``dcmsend`` when DCMTK is installed and the target asks
nothing only pynetdicom does (TLS, several associations); ``retrieve_backend="auto"`` likewise
``getscu``/``movescu`` (why: ``blocks._transfer_backend``). ``dcmsend`` runs as mercure runs it
(``blocks._dcmsend``). pynetdicom: one association per (case, target), or ``max_associations``
in parallel processes, contexts from the files' headers, files sent undecoded. Either way every
instance's DIMSE status counts: the case is sent only when every instance was accepted
(warnings too, unless ``warning_counts_as_sent`` is off), and a dcmsend-format ``sent.txt`` is
written for tooling that parses mercure's.

``DicomTLSTarget`` is mercure's DICOM+TLS target: the same sender over TLS, with the peer's
certificate verified against ``ca_cert``. Unlike mercure's ``storescu +tls`` call it is
recursive, writes the report and checks every instance's status, as the DICOM target does.

Over 400 lines because a block owns its verbs: the two targets' fields, their send, connection
test, find and retrieve entry points and the peer they build stay together; the protocol work
itself is in the private ``blocks._*`` modules.
"""

from __future__ import annotations

import ipaddress
from dataclasses import replace
from pathlib import Path
from typing import Any, ClassVar, Literal

from pydantic import Field, field_validator

from blocks import _dcmsend, _dimse, _dimse_qr, _transcode, _transfer_backend
from blocks._association import DicomPeer
from blocks._commitment import supports_commitment
from blocks._committed_send import CommitmentPolicy, send_committed
from blocks._dcmsend_convert import parse_instances
from blocks._dcmsend_report import write_report
from blocks._dimse_results import store_failure_is_transient
from blocks._dimse_tls import TLSOptions
from blocks._net import tcp_reachable
from blocks._peer_gate import peer_gate
from blocks.base import (
    CaseOrigin,
    QueryTarget,
    RetrieveRequest,
    SendContext,
    SendResult,
    dicom_files,
)
from blocks.errors import ConfigError, PermanentTargetError, TransientTargetError
from blocks.qr import (
    Level,
    RetrieveResult,
    check_accession,
    normalize_filters,
    not_found,
    plan_retrieve,
)

__all__ = ["DicomTLSTarget", "DicomTarget"]

DEFAULT_PORT = 104
DEFAULT_CALLING_AET = "DCMSEND"  # what dcmsend calls itself when mercure passes no -aet
DEFAULT_CALLED_AET = "ANY-SCP"
#: Calling AE title for queries when the target sets none (mercure's).
DEFAULT_QR_CALLING_AET = "MERCURE"


class DicomTarget(QueryTarget):
    """A DICOM node that receives cases by C-STORE and answers C-FIND / C-GET / C-MOVE.

    Field names are mercure's, so a mercure.json target imports one to one.
    """

    _block_type_name = "DICOM Target"
    _block_type_slug = "dicom-target"
    _description = "A DICOM node that receives cases by C-STORE (mercure's DICOM target)."
    target_type: ClassVar[str] = "dicom"
    _example_document = "pacs-main"

    ip: str = Field(
        description='Host name or IP address; "sender" sends back to the case\'s sender address.'
    )
    port: str = Field(default="104", description="TCP port (default 104).")
    aet_target: str = Field(default="", description="Called AE title (empty: ANY-SCP).")
    aet_source: str | None = Field(default="", description="Calling AE title (empty: DCMSEND).")
    pass_sender_aet: bool | None = Field(
        default=False, description="Use the case's sender AE title as calling AE title."
    )
    pass_receiver_aet: bool | None = Field(
        default=False, description="Use the case's receiver AE title as called AE title."
    )
    warning_counts_as_sent: bool = Field(
        default=True,
        description="Count instances acknowledged with a DIMSE warning as sent (mercure: no).",
    )
    max_associations: int = Field(
        default=1, ge=1, le=16, description="Parallel associations (processes) per send."
    )
    #: 1 by default: many PACS serve one association at a time (why: ``blocks._peer_gate``).
    concurrent_associations: int = Field(
        default=1,
        ge=1,
        le=64,
        description="Cases sent to this node at once from one process (1: one association at a "
        "time, as many PACS accept; raise it for a node that accepts parallel associations).",
    )
    connect_timeout: float = Field(default=10, gt=0, description="TCP connect timeout, seconds.")
    acse_timeout: float = Field(default=30, gt=0, description="Association timeout, seconds.")
    dimse_timeout: float = Field(default=60, gt=0, description="Per-response timeout, seconds.")
    network_timeout: float = Field(default=60, gt=0, description="Idle network timeout, seconds.")
    retrieve_method: Literal["get", "move"] = Field(
        default="get", description="How studies are retrieved from this node: C-GET or C-MOVE."
    )
    move_destination_aet: str = Field(
        default="", description="AE title C-MOVE sends to (our Storage SCP)."
    )
    move_destination_port: int = Field(
        default=11113,
        ge=1,
        le=65535,
        description="Port our Storage SCP listens on during a C-MOVE (the node must know it).",
    )
    move_listen_address: str = Field(
        default="",
        description="Address our C-MOVE Storage SCP binds to (empty: our address on the route "
        "to the node).",
    )
    retrieve_backend: Literal["auto", "pynetdicom", "dcmtk"] = Field(
        default="auto",
        description=(
            "How studies are retrieved: auto (DCMTK getscu/movescu when installed, else "
            "pynetdicom), pynetdicom in-process, or DCMTK."
        ),
    )
    convert: Literal["when_refused", "never"] = Field(
        default="when_refused",
        description="Decode a compressed file the receiver refuses in its own transfer syntax "
        "and send it uncompressed (when_refused), or fail it naming the syntax (never, as "
        "mercure).",
    )
    preferred_transfer_syntax: str | None = Field(
        default=None,
        description="A lossless compressed transfer syntax (UID or keyword: RLELossless, "
        "JPEGLSLossless, JPEG2000Lossless) uncompressed files are sent in when the receiver "
        "accepts it (with backend auto it selects pynetdicom, dcmsend cannot encode; empty: "
        "as stored).",
    )
    backend: Literal["auto", "pynetdicom", "dcmsend"] = Field(
        default="auto",
        description=(
            "How cases are sent: auto (DCMTK dcmsend when installed, unless TLS or "
            "max_associations > 1 need pynetdicom), pynetdicom in-process, or dcmsend as "
            "mercure does (one association, max_associations does not apply)."
        ),
    )

    storage_commitment: Literal["off", "request", "require"] = Field(
        default="off",
        description="DICOM Storage Commitment after each send: off, request (the answer is "
        "recorded, a missing one is a warning) or require (complete only once every instance "
        "is committed).",
    )
    storage_commitment_timeout: float = Field(
        default=600,
        gt=0,
        description="Seconds to wait for the Storage Commitment answer (N-EVENT-REPORT).",
    )

    @field_validator("port", mode="before")
    @classmethod
    def _port_as_text(cls, value: Any) -> Any:
        return str(value) if isinstance(value, int) else value

    @field_validator("preferred_transfer_syntax", mode="before")
    @classmethod
    def _preferred_as_uid(cls, value: Any) -> Any:
        return _transcode.preferred_syntax(value)

    def conversion(self) -> _transcode.Conversion:
        """How refused syntaxes are handled and which syntax is preferred (``convert``,
        ``preferred_transfer_syntax``)."""
        return _transcode.Conversion(
            convert=self.convert == "when_refused", preferred=self.preferred_transfer_syntax
        )

    @property
    def writes_dcmsend_report(self) -> bool:
        return True

    def send_backend(self) -> _transfer_backend.SendBackend:
        """The backend :meth:`send` uses now (``auto`` resolved)."""
        return _transfer_backend.send_backend(
            self.backend,
            tls=self.tls_options() is not None,
            associations=self.max_associations,
            preferred=bool(self.preferred_transfer_syntax),
        )

    def _retrieve_backend(self) -> _transfer_backend.RetrieveBackend:
        return _transfer_backend.retrieve_backend(
            self.retrieve_backend,
            method=self.retrieve_method,
            listen_address=self.move_listen_address,
        )

    def backends(self) -> dict[str, str]:
        """The send and retrieve backends in use, ``auto`` resolved (``"dcmsend (auto)"``)."""
        auto = " (auto)"
        return {
            "send": self.send_backend() + (auto if self.backend == "auto" else ""),
            "retrieve": self._retrieve_backend()
            + (auto if self.retrieve_backend == "auto" else ""),
        }

    def get_peer(self, context: SendContext | None = None) -> DicomPeer:
        """The peer a case is sent to, mercure's rules applied: the one place it is built.

        ``ip`` "sender" is the case's sender address; ``pass_sender_aet``/``pass_receiver_aet``
        take the AE titles from the case. Timeouts and TLS options come from the fields.
        """
        host = self.ip
        info = context.task.info if context is not None else None
        if host == "sender":
            if info is None or info.sender_address in ("", "MISSING"):
                raise PermanentTargetError(
                    f"target {self.target_name}: ip is 'sender' but the case has no sender address"
                )
            host = info.sender_address
        if not host:
            raise PermanentTargetError(f"target {self.target_name}: no ip configured")
        port = int(self.port) if str(self.port).strip() else DEFAULT_PORT
        called = self.aet_target or DEFAULT_CALLED_AET
        calling = self.aet_source or DEFAULT_CALLING_AET
        if info is not None and self.pass_sender_aet and info.sender_aet not in ("", "MISSING"):
            calling = info.sender_aet
        if info is not None and self.pass_receiver_aet and info.receiver_aet not in ("", "MISSING"):
            called = info.receiver_aet
        return DicomPeer(
            host,
            port,
            called,
            calling,
            connect_timeout=self.connect_timeout,
            acse_timeout=self.acse_timeout,
            dimse_timeout=self.dimse_timeout,
            network_timeout=self.network_timeout,
            tls=self.tls_options(),
        )

    def peer(self, context: SendContext | None = None) -> tuple[str, int, str, str]:
        """(host, port, called AE, calling AE) of :meth:`get_peer`."""
        peer = self.get_peer(context)
        return peer.host, peer.port, peer.called_aet, peer.calling_aet

    def query_peer(self) -> DicomPeer:
        """The peer to query and retrieve from (calling AE title: ``aet_source`` or MERCURE)."""
        if self.target_type != "dicom":
            raise ConfigError(
                f"target {self.target_name}: query/retrieve is supported for DICOM targets only, "
                f"not {self.target_type}"
            )
        if self.ip == "sender":
            raise ConfigError(f"target {self.target_name}: cannot query the 'sender' address")
        return replace(self.get_peer(), calling_aet=self.aet_source or DEFAULT_QR_CALLING_AET)

    def _label(self, peer: DicomPeer) -> str:
        return f"target {self.target_name} ({peer.address} {peer.calling_aet}->{peer.called_aet})"

    def send(self, context: SendContext) -> SendResult:
        files = dicom_files(context.case_dir)
        if not files:
            raise PermanentTargetError(f"target {self.target_name}: the case has no *.dcm files")
        peer = self.get_peer(context)
        if self.storage_commitment != "off":
            policy = CommitmentPolicy(
                self.storage_commitment,
                self.storage_commitment_timeout,
                self.target_name,
                self._label(peer),
            )
            return send_committed(
                context.case_dir,
                context.files,
                files,
                peer,
                policy,
                lambda some: self._store(context, some, peer),
                self.logger,
            )
        return self._store(context, files, peer)

    def _store(self, context: SendContext, files: list[Path], peer: DicomPeer) -> SendResult:
        """C-STORE ``files`` with the backend in use; raises unless every one arrived."""
        with peer_gate(peer.host, peer.port, peer.called_aet, self.concurrent_associations):
            if self.send_backend() == "dcmsend":
                return self._send_with_dcmsend(context, files, peer)
            options = _dimse.StoreOptions(
                associations=self.max_associations,
                case=context.files,
                conversion=self.conversion(),
            )
            result = _dimse.store_files(files, peer, options)
        if context.report_path is not None:
            write_report(context.report_path, result)
        failed = result.failed(self.warning_counts_as_sent)
        if failed:
            sample = failed[0]
            why = sample.error or _dimse.status_text(sample.status)
            message = (
                f"{self._label(peer)}: only {len(files) - len(failed)} out of {len(files)} "
                f"instances were sent successfully (first failure: {sample.path.name}: {why})"
            )
            transient = store_failure_is_transient(failed)
            raise (TransientTargetError if transient else PermanentTargetError)(message)
        size = sum(r.size for r in result.instances)
        sent_as = _transcode.sent_as(result.instances)
        return SendResult(
            files=len(files),
            bytes=size,
            detail=f"{len(files)} instances to {_route(peer)}; {_transcode.describe(sent_as)}",
            extra={
                "associations": result.associations,
                "backend": "pynetdicom",
                "transfer_syntaxes": sent_as,
            },
        )

    def _send_with_dcmsend(
        self, context: SendContext, files: list[Path], peer: DicomPeer
    ) -> SendResult:
        outcome = _dcmsend.send_case(
            context.files,
            peer,
            report_path=context.report_path,
            files=files,
            warnings_ok=self.warning_counts_as_sent,
            label=self._label(peer),
            conversion=self.conversion(),
        )
        sent_as = _transcode.sent_as(parse_instances(outcome.report).instances)
        return SendResult(
            files=outcome.instances,
            bytes=outcome.dataset_bytes,
            detail=f"{outcome.instances} instances to {_route(peer)}, dcmsend; "
            + _transcode.describe(sent_as),
            extra={
                "associations": outcome.associations,
                "backend": "dcmsend",
                "transfer_syntaxes": sent_as,
            },
        )

    @staticmethod
    def connection_ok(result: dict[str, Any]) -> bool:
        usable = bool(result.get("loopback_mode")) or bool(result.get("c-echo"))
        return (
            usable
            and result.get("dcmsend", True) is not False
            and result.get("storage_commitment", True) is not False
        )

    def _commitment_probe(self, peer: DicomPeer, reachable: bool) -> dict[str, Any]:
        """``storage_commitment``: whether the peer accepts the Storage Commitment Push Model
        SOP class (only when the target uses it)."""
        if self.storage_commitment == "off":
            return {}
        return {"storage_commitment": reachable and supports_commitment(peer)}

    def test_connection(self) -> dict[str, Any]:
        """mercure's keys: ``ping`` (here: TCP connect), ``c-echo``, ``loopback_mode``.

        With the dcmsend backend, also ``dcmsend``: whether DCMTK's dcmsend was found.
        """
        extra = (
            {"dcmsend": _dcmsend.find_dcmsend() is not None} if self.backend == "dcmsend" else {}
        )
        if self.ip == "sender":
            return {"ping": False, "c-echo": False, "loopback_mode": True, **extra}
        peer = self.get_peer()
        reachable = tcp_reachable(peer.host, peer.port, timeout=min(self.connect_timeout, 5))
        echo = reachable and _dimse.echo(peer, timeout=5)
        extra |= self._commitment_probe(peer, reachable)
        return {"ping": reachable, "c-echo": bool(echo), "loopback_mode": False, **extra}

    def _find(
        self, accession: str, filters: dict[str, Any] | None, level: Level
    ) -> list[dict[str, Any]]:
        """C-FIND (study root) by accession number."""
        return _dimse_qr.find(self.query_peer(), accession, filters, level)

    def _retrieve(self, request: RetrieveRequest) -> RetrieveResult:
        """C-GET or C-MOVE (``retrieve_method``) what ``find`` finds."""
        peer = self.query_peer()
        wanted = normalize_filters(request.filters)
        rows = _dimse_qr.find(peer, request.accession, wanted, "series")
        if not rows:
            raise not_found(check_accession(request.accession), wanted)
        return _dimse_qr.retrieve(
            peer,
            plan_retrieve(rows, wanted),
            request.destination,
            method=self.retrieve_method,
            move_aet=self.move_destination_aet or peer.calling_aet,
            listen=(self.move_listen_address, int(self.move_destination_port)),
            backend=self._retrieve_backend(),
            progress=request.progress,
            limits=request.limits,
        )

    def case_origin(self) -> CaseOrigin:
        return CaseOrigin(
            address=self.ip or "MISSING",
            sender_aet=self.aet_target or "MISSING",
            receiver_aet=self.aet_source or "MISSING",
        )

    def tls_options(self) -> TLSOptions | None:
        """TLS settings of the associations (none for plain DICOM); read by :meth:`get_peer`."""
        return None


class DicomTLSTarget(DicomTarget):
    """A DICOM node that receives cases by C-STORE over TLS (mercure's DICOM+TLS target).

    The peer's certificate must chain to ``ca_cert``; our client certificate
    (``tls_cert``/``tls_key``, as DCMTK's ``storescu +tls`` takes them) is presented to the peer.
    Field names are mercure's, so a mercure.json target imports one to one.
    """

    _block_type_name = "DICOM TLS Target"
    _block_type_slug = "dicom-tls-target"
    _description = "A DICOM node that receives cases by C-STORE over TLS (mercure's DICOM+TLS)."
    target_type: ClassVar[str] = "dicomtls"
    _example_document = "pacs-tls"

    tls_key: str = Field(
        default="", description="Private key file (PEM, unencrypted) of our client certificate."
    )
    tls_cert: str = Field(default="", description="Our client certificate file (PEM).")
    ca_cert: str = Field(
        default="",
        description="CA certificate file (PEM) the peer's certificate must chain to "
        "(empty: the system's CA store, and the certificate must name the host in ip).",
    )
    tls_check_hostname: bool = Field(
        default=False,
        description="With ca_cert, also require the peer's certificate to name the host in ip "
        "(DCMTK, and so mercure, does not check it; without ca_cert it is always checked).",
    )

    def tls_options(self) -> TLSOptions:
        return TLSOptions(
            ca_cert=self.ca_cert,
            cert=self.tls_cert,
            key=self.tls_key,
            check_hostname=self.tls_check_hostname,
        )

    def send(self, context: SendContext) -> SendResult:
        if self.backend == "dcmsend":
            raise PermanentTargetError(
                f"target {self.target_name}: DICOM+TLS is sent with the pynetdicom backend only "
                "(dcmsend has no TLS)"
            )
        return super().send(context)

    def test_connection(self) -> dict[str, Any]:
        """mercure's keys ``ping`` (here: TCP connect) and ``c-echo`` (over TLS), and ``err``.

        ``err`` says why the C-ECHO failed (certificate not accepted, refused, ...), or is empty;
        ``tls_verify`` what the handshake verifies (CA, and whether the host name is checked).
        """
        verify = {"tls_verify": self.tls_options().verification()}
        if self.ip == "sender":
            return {"ping": False, "c-echo": False, "loopback_mode": True, **verify}
        peer = self.get_peer()
        if not tcp_reachable(peer.host, peer.port, timeout=min(self.connect_timeout, 5)):
            return {
                "ping": False,
                "c-echo": False,
                "err": f"{peer.address} is not reachable",
                **verify,
            }
        echo = _dimse.echo(peer, timeout=5)
        verify |= self._commitment_probe(peer, True)
        return {"ping": True, "c-echo": echo.ok, "err": "" if echo.ok else echo.detail, **verify}

    def import_warnings(self) -> list[str]:
        """Addressed by IP with no ``ca_cert``: the system store's certificates name hosts, so
        the host name check (always on without ``ca_cert``) will refuse the peer."""
        if self.ca_cert or self.ip == "sender" or not _is_ip_address(self.ip):
            return []
        return [
            f"addressed by IP ({self.ip}) with no ca_cert: the peer's certificate is now checked "
            "for that host name against the system CA store and will most likely be refused; "
            "set ca_cert to the CA that signed it (or use a host name it holds)"
        ]


def _is_ip_address(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def _route(peer: DicomPeer) -> str:
    """``host:port (CALLING->CALLED)`` for a send's detail line."""
    return f"{peer.address} ({peer.calling_aet}->{peer.called_aet})"
