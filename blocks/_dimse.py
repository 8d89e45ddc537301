"""DICOM C-STORE and C-ECHO client on pynetdicom: the sending half of a DICOM target.

mercure shells out to DCMTK ``dcmsend`` once per case; this module does the same job in-process
so that per-instance DIMSE statuses come back as data (``StoreResult``, ``blocks._dimse_results``)
instead of a text report to parse, and so the Prefect layer can decide what is worth a retry. It
is Prefect-free on purpose: it is exercised directly against real peers in the tests.
Associations are opened (and their failures translated) in ``blocks._association``.

What it does, and why:

* One association per call (per association slot) carries all files: association set-up costs
  far more than a C-STORE of a small image.
* Presentation contexts come from the files' headers only (file meta), one per
  (SOP class, transfer syntax list): the file's own transfer syntax, plus Explicit/Implicit VR
  Little Endian for uncompressed little-endian files, so a peer that only takes implicit VR still
  receives them; a compressed file also gets a context of the uncompressed syntaxes, and an
  uncompressed one a context of ``preferred_transfer_syntax`` (``blocks._transcode``). DICOM
  allows 128 contexts per association; more are split over consecutive associations.
* Every file is opened without following a link (``tasks.safefiles.CaseFiles``) when its header
  is read and again when it is sent, and pynetdicom reads it through that descriptor: a link
  planted in the case meanwhile is refused (the file's outcome names it), never read.
* Files are streamed from disk without decoding (pynetdicom's chunked C-STORE) whenever the peer
  accepted the file's own transfer syntax; only an uncompressed file the peer wants in another
  uncompressed syntax is read fully and re-encoded by pynetdicom. Pixel data is decoded only
  when the peer refused a compressed file's own syntax (``convert``), and encoded only in an
  accepted ``preferred_transfer_syntax``; the file on disk is never changed.
* ``StoreOptions.associations > 1`` sends in parallel in separate *processes*
  (``blocks._process_pool``). It only pays off against peers that serve associations
  concurrently (DCMTK storescp does not, unless started with ``--fork``).
* A peer with ``tls`` runs the same associations over TLS (DICOM+TLS targets,
  ``blocks._dimse_tls``).
* A missing response (timeout, abort, or pynetdicom 3.0.4 losing it) is recorded as
  ``status=None`` -- never as sent -- the association is aborted and the remaining files go on a
  new association. ``store_files`` raises only when no association could be made at all.

Over 400 lines because the C-STORE loop, the file inspection and context planning it runs on,
and the entry points are one algorithm; the worker processes preload exactly this module.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime
from pathlib import Path
from typing import Any, BinaryIO, Literal

from pydicom import dcmread
from pydicom.uid import UID, DeflatedExplicitVRLittleEndian
from pynetdicom import _config
from pynetdicom.dsutils import split_dataset
from pynetdicom.presentation import build_context

from blocks._association import DicomPeer, NoAcceptedContext, association, make_ae, open_association
from blocks._dimse_results import (
    EchoResult,
    InstanceResult,
    StoreResult,
    status_category,
    status_text,
)
from blocks._dimse_tls import TLSOptions
from blocks._process_pool import SharedPool
from blocks._pynetdicom_fix import (  # the patch's private names stay importable here for its tests
    _PATCH_MARK,  # noqa: F401
    REACTOR_RACE_FIXED,
    _patch_reactor_race,  # noqa: F401
)
from blocks._transcode import (
    UNCOMPRESSED,
    Conversion,
    ConversionError,
    decode,
    encode,
    is_uncompressed,
    syntax_name,
)
from blocks.errors import TargetError
from tasks.safefiles import CaseFiles, descriptor_path

__all__ = [
    "MAX_CONTEXTS",
    "MAX_STALLED_ASSOCIATIONS",
    "REACTOR_RACE_FIXED",
    "DicomPeer",
    "EchoResult",
    "InstanceResult",
    "StoreOptions",
    "StoreResult",
    "TLSOptions",
    "echo",
    "shutdown_workers",
    "status_category",
    "status_text",
    "store_files",
]

LOGGER = logging.getLogger(__name__)

#: DICOM limit: presentation context IDs are odd numbers 1..255.
MAX_CONTEXTS = 128
_ASSOCIATION_LOST = "association lost before the C-STORE request was sent"
#: Give up on the rest of a slot after this many associations in a row lost their first response.
MAX_STALLED_ASSOCIATIONS = 3

# send_c_store(<path>) streams the dataset bytes from the file instead of decoding the file.
# Needs an accepted context with the file's own transfer syntax; other cases pass a Dataset.
_config.STORE_SEND_CHUNKED_DATASET = True

_VERIFICATION = UID("1.2.840.10008.1.1")
#: The sender processes of parallel associations (this module preloaded).
_WORKERS = SharedPool(__name__)


@dataclass(frozen=True)
class StoreOptions:
    """How one ``store_files`` call sends, beyond the peer itself.

    ``associations > 1`` splits the files round-robin over that many parallel associations, each
    in its own process. ``only_failed_of`` re-sends only the files an earlier result did not
    record as stored (``warnings_ok`` decides whether a warning counted as stored).
    """

    associations: int = 1
    only_failed_of: StoreResult | None = None
    warnings_ok: bool = True
    #: The case the files belong to (None: each file's own folder).
    case: CaseFiles | None = None
    #: Decoding when the peer refuses a file's syntax, and the preferred syntax.
    conversion: Conversion = field(default_factory=Conversion)


# --------------------------------------------------------------------------------------------
# Files and presentation contexts (picklable: they travel to the worker processes)
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _FileInfo:
    index: int
    path: Path
    sop_class_uid: str
    sop_instance_uid: str
    transfer_syntax: str
    size: int

    def keys(self, conversion: Conversion) -> list[tuple[str, tuple[str, ...]]]:
        """The presentation contexts this file needs: (SOP class, transfer syntaxes)."""
        sop = self.sop_class_uid
        return [(sop, syntaxes) for syntaxes in conversion.proposals(self.transfer_syntax)]

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


def _open(case: CaseFiles | None, path: Path) -> BinaryIO:
    """``path``, opened without following a link (in ``case``, else in its own folder)."""
    if case is None:
        return CaseFiles(path.parent).open(Path(path.name))
    return case.open(path)


def _inspect(index: int, path: Path, case: CaseFiles | None) -> _FileInfo | InstanceResult:
    """Read the file meta only (SOP class/instance, transfer syntax, dataset size)."""
    try:
        with _open(case, path) as fh:
            meta, offset = split_dataset(Path(descriptor_path(fh)))
            size = os.fstat(fh.fileno()).st_size - offset
        sop_class = str(meta.MediaStorageSOPClassUID)
        sop_instance = str(meta.MediaStorageSOPInstanceUID)
        syntax = str(meta.TransferSyntaxUID)
    except OSError as exc:  # a link, a FIFO, gone: this file's outcome, named
        return _unreadable(path, f"cannot read {path.name}: {exc.strerror or exc}")
    except Exception as exc:  # unreadable, not DICOM, no file meta: a per-file outcome
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        return _unreadable(path, f"unreadable DICOM file: {reason}")
    return _FileInfo(index, path, sop_class, sop_instance, syntax, size)


def _unreadable(path: Path, error: str) -> InstanceResult:
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
        error=error,
    )


_ContextKey = tuple[str, tuple[str, ...]]


def _context_batch(
    pending: Sequence[_FileInfo], conversion: Conversion | None = None
) -> tuple[list[_FileInfo], list[_ContextKey]]:
    """Files for the next association: those whose contexts all fit in the first 128 needed."""
    conversion = conversion or Conversion()
    keys: list[_ContextKey] = []
    chosen: set[_ContextKey] = set()
    batch: list[_FileInfo] = []
    for info in pending:
        needed = [k for k in dict.fromkeys(info.keys(conversion)) if k not in chosen]
        if len(keys) + len(needed) <= MAX_CONTEXTS:
            chosen.update(needed)
            keys += needed
            batch.append(info)
    return batch, keys


# --------------------------------------------------------------------------------------------
# Sending
# --------------------------------------------------------------------------------------------


def _send_one(
    assoc: Any,
    info: _FileInfo,
    number: int,
    msg_id: int,
    case: CaseFiles | None,
    conversion: Conversion,
) -> InstanceResult:
    """One C-STORE on an established association; never raises."""
    plan = _plan(assoc, info, conversion)
    if isinstance(plan, str):
        return info.result(association=number, no_context=True, error=plan)
    context, how = plan
    network = str(context.transfer_syntax[0])
    sent = {"association": number, "context_id": context.context_id}
    try:
        source = _open(case, info.path)
    except OSError as exc:  # became a link, a FIFO, or went away since it was inspected
        return info.result(
            **sent,
            network_transfer_syntax=network,
            error=f"cannot read {info.path.name}: {exc.strerror or exc}",
        )
    try:
        with source:
            payload = _payload(source, info, how, network, conversion)
            response = assoc.send_c_store(payload, msg_id=msg_id)
    except ConversionError as exc:  # no decoder, over the limit, corrupt: fails for good
        return info.result(**sent, no_context=True, error=str(exc))
    except RuntimeError:  # association gone between two C-STOREs (peer abort, network)
        return info.result(**sent, network_transfer_syntax=network, error=_ASSOCIATION_LOST)
    except Exception as exc:  # unreadable file, encoding error: this file's outcome only
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        return info.result(**sent, network_transfer_syntax=network, error=f"cannot send: {reason}")
    sent["network_transfer_syntax"] = network
    status = response.get("Status") if response is not None else None
    if status is None:
        why = (
            "association aborted while waiting for the C-STORE response"
            if assoc.is_aborted or assoc.acse.is_aborted()
            else "no C-STORE response (DIMSE timeout or lost response)"
        )
        return info.result(**sent, request_sent=True, error=why)
    return info.result(**sent, request_sent=True, status=int(status))


#: How a file goes over an accepted context: streamed as it is, re-encoded by pynetdicom
#: (uncompressed to uncompressed), decoded, or encoded in the preferred syntax.
_How = Literal["stream", "reencode", "decode", "encode"]


def _plan(assoc: Any, info: _FileInfo, conversion: Conversion) -> tuple[Any, _How] | str:
    """The accepted context a file is sent on and how, or why it cannot be sent (a text)."""
    accepted: dict[str, Any] = {}
    for cx in assoc.accepted_contexts:
        if cx.abstract_syntax == info.sop_class_uid:
            accepted.setdefault(str(cx.transfer_syntax[0]), cx)
    own = info.transfer_syntax
    # In pynetdicom's order of choice for a dataset it encodes: explicit before implicit VR.
    uncompressed = [
        accepted[s] for s in (*UNCOMPRESSED, DeflatedExplicitVRLittleEndian) if s in accepted
    ]
    preferred = conversion.preferred
    if preferred and preferred != own and is_uncompressed(own) and preferred in accepted:
        return accepted[preferred], "encode"
    if own in accepted:
        return accepted[own], "stream"
    if uncompressed and is_uncompressed(own):
        return uncompressed[0], "reencode"
    what = f"{UID(info.sop_class_uid).name} in {syntax_name(own)}"
    if not uncompressed or is_uncompressed(own):
        return f"no accepted presentation context for {what}"
    if not conversion.convert:
        return f"no accepted presentation context for {what} (convert: never)"
    return uncompressed[0], "decode"


def _payload(
    source: BinaryIO, info: _FileInfo, how: _How, network: str, conversion: Conversion
) -> Any:
    """What ``send_c_store`` gets: a path is streamed from the file (chunked), a Dataset is
    encoded by pynetdicom in the context's syntax."""
    name = info.path.name
    limit = conversion.max_decoded_bytes
    if how == "stream":
        return Path(descriptor_path(source))
    if how == "decode":
        return decode(source, name, info.transfer_syntax, limit)
    if how == "encode":
        return encode(source, name, info.transfer_syntax, network, limit)
    return dcmread(source)


def _store_serial(
    paths: Sequence[tuple[int, Path]],
    peer: DicomPeer,
    case: CaseFiles | None,
    conversion: Conversion | None = None,
) -> _SlotResult:
    """Send ``paths`` over as few associations as possible, one after the other."""
    conversion = conversion or Conversion()
    out = _SlotResult()
    pending: list[_FileInfo] = []
    for index, path in paths:
        inspected = _inspect(index, path, case)
        if isinstance(inspected, InstanceResult):
            out.results[index] = inspected
        else:
            pending.append(inspected)
    ae = make_ae(peer)
    stalled = 0
    while pending:
        batch, keys = _context_batch(pending, conversion)
        contexts = [build_context(sop, list(syntaxes)) for sop, syntaxes in keys]
        try:
            assoc = open_association(peer, contexts, ae=ae)
        except NoAcceptedContext:  # A-ASSOCIATE-AC, but every context rejected: data
            assoc = None
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
        for msg_id, info in enumerate(batch):
            if assoc is None:
                result = info.result(
                    association=number,
                    no_context=True,
                    error="the peer accepted none of the proposed presentation contexts",
                )
            elif not assoc.is_established:
                result = info.result(error=_ASSOCIATION_LOST)
            else:
                result = _send_one(assoc, info, number, msg_id % 0xFFFF + 1, case, conversion)
            if result.error == _ASSOCIATION_LOST:
                lost += 1  # not sent: stays pending for the next association
                break
            out.results[info.index] = result
            if result.request_sent and result.status is None:
                lost += 1
                LOGGER.warning(
                    "No C-STORE response from %s on association %d (%s); continuing on a new "
                    "association",
                    peer.describe(),
                    number,
                    result.error,
                )
                break
            if result.status is not None:
                answered += 1
        if assoc is not None and assoc.is_established:
            if lost:
                assoc.abort()
            else:
                assoc.release()
        pending = [i for i in pending if i.index not in out.results]
        stalled = stalled + 1 if (lost and not answered) else 0
        if pending and stalled >= MAX_STALLED_ASSOCIATIONS:
            reason = f"gave up: {stalled} associations in a row without a C-STORE response"
            LOGGER.warning("%s: %s", peer.describe(), reason)
            for info in pending:
                out.results[info.index] = info.result(error=reason)
            break
    return out


def _store_slot(
    paths: Sequence[tuple[int, Path]],
    peer: DicomPeer,
    case: CaseFiles | None,
    conversion: Conversion,
) -> _SlotResult | TargetError:
    """Worker-process entry point: errors come back as values, so every slot is merged."""
    try:
        return _store_serial(paths, peer, case, conversion)
    except TargetError as exc:
        return exc


def shutdown_workers() -> None:
    """Stop the sender processes (they are restarted on the next parallel send)."""
    _WORKERS.shutdown()


def _skip_stored(files: Sequence[Path], earlier: StoreResult, warnings_ok: bool) -> list[Path]:
    stored = {Path(i.path) for i in earlier.instances if i.ok(warnings_ok)}
    return [p for p in files if Path(p) not in stored]


# --------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------


def store_files(
    files: Sequence[Path], peer: DicomPeer, options: StoreOptions | None = None
) -> StoreResult:
    """C-STORE ``files`` to ``peer``; statuses are returned, not raised.

    With ``options.associations > 1`` the per-process results are merged (association numbers
    are renumbered 1..n over all); with ``options.only_failed_of`` the result covers just the
    files sent again. Raises ``TransientTargetError`` (connection refused, timeout, abort,
    transient rejection) or ``PermanentTargetError`` (permanent A-ASSOCIATE-RJ, failed TLS
    handshake, unusable TLS files) only when no association at all could be made.
    """
    options = options or StoreOptions()
    begin = time.monotonic()
    started = datetime.now().astimezone()
    paths = [Path(p) for p in files]
    if options.only_failed_of is not None:
        paths = _skip_stored(paths, options.only_failed_of, options.warnings_ok)
    indexed = list(enumerate(paths))
    slots = max(1, min(int(options.associations), len(indexed)))
    if slots == 1:
        outcomes: list[_SlotResult | TargetError] = [
            _store_serial(indexed, peer, options.case, options.conversion)
        ]
        shares = [indexed]
    else:
        shares = [indexed[k::slots] for k in range(slots)]
        outcomes = _WORKERS.run_each(
            _store_slot, [(s, peer, options.case, options.conversion) for s in shares]
        )
    errors = [o for o in outcomes if isinstance(o, TargetError)]
    if errors and len(errors) == len(outcomes):
        raise errors[0]
    merged: dict[int, InstanceResult] = {}
    total_associations = total_contexts = 0
    for share, outcome in zip(shares, outcomes, strict=True):
        if isinstance(outcome, TargetError):
            for index, path in share:
                inspected = _inspect(index, path, options.case)
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
        peer=peer.address,
        calling_aet=peer.calling_aet,
        called_aet=peer.called_aet,
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
        peer.describe(),
        len(paths),
        result.elapsed,
        total_associations,
        counts["success"],
        counts["warning"],
        counts["failure"],
        counts["none"],
    )
    return result


def echo(peer: DicomPeer, *, timeout: float = 5) -> EchoResult:
    """C-ECHO the peer (mercure's connection test) with every timeout ``timeout``; never raises.

    Refused, rejected, an unusable TLS file or a failed handshake: a failed echo whose
    ``detail`` says why.
    """
    peer = peer.with_timeout(timeout)
    try:
        with association(peer, [build_context(_VERIFICATION)]) as assoc:
            response = assoc.send_c_echo()
    except NoAcceptedContext:
        return EchoResult(False, None, f"{peer.describe()} does not accept Verification")
    except TargetError as exc:
        return EchoResult(False, None, str(exc))
    status = response.get("Status") if response is not None else None
    if status is None:
        return EchoResult(False, None, f"no C-ECHO response from {peer.describe()}")
    code = int(status)
    return EchoResult(code == 0x0000, code, f"C-ECHO status 0x{code:04X} from {peer.describe()}")
