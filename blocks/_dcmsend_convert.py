"""Conversion on the dcmsend backend: dcmsend's own decoders, and a second pass for the rest.

``dcmsend`` proposes a compressed file in its own syntax plus the uncompressed ones and decodes
it when only an uncompressed context is accepted, but only for what DCMTK can decode (JPEG,
JPEG-LS, RLE; lossy JPEG too with ``+dly``, which ``convert="when_refused"`` passes). It has no
JPEG 2000 decoder: such a file is proposed in its own syntax only, and a receiver that refuses
it would stop the transfer (DCMTK halts on the first instance it cannot send). So when a case
holds a file dcmsend cannot decode but we can, the first pass runs with ``-nh`` (go on past
it), the files the report lists with ``<no acceptable presentation context>`` are decoded
(``blocks._transcode``) into a private temporary folder, and dcmsend sends that folder in a
second pass. The two reports become one, in dcmsend's layout, each instance with its original
syntax and the one that went over the network. ``convert="never"`` passes ``-dn``: a file goes
in its own syntax or fails, naming it.

Prefect-free.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import replace
from datetime import datetime
from pathlib import Path

from pydicom.filereader import read_file_meta_info
from pydicom.uid import UID, DeflatedExplicitVRLittleEndian, RLELossless

from blocks._dcmsend_report import format_report
from blocks._dimse_results import InstanceResult, StoreResult
from blocks._transcode import (
    DECODERS,
    JPEG_LS_SYNTAXES,
    JPEG_SYNTAXES,
    Conversion,
    ConversionError,
    is_uncompressed,
    syntax_name,
    write_decoded,
)
from blocks.errors import PermanentTargetError
from tasks.safefiles import CaseFiles, open_new

__all__ = [
    "DCMTK_DECODES",
    "conversion_args",
    "parse_instances",
    "refusal_error",
    "refused_for_syntax",
    "second_pass",
]

#: What ``dcmsend +dly`` decodes itself (DCMTK 3.6.7 ``--list-decoders``, plus deflate).
DCMTK_DECODES = frozenset(
    {*JPEG_SYNTAXES, *JPEG_LS_SYNTAXES, RLELossless, DeflatedExplicitVRLittleEndian}
)
_NO_CONTEXT = "<no acceptable presentation context>"
#: What dcmsend prints for a file whose (only) presentation context the peer rejected.
_CONTEXT_REJECTED = "Bad presentation context ID"

#: Runs dcmsend on a folder of ``*.dcm`` files with a report path and extra arguments and returns
#: the report's bytes (``blocks._dcmsend``; raises a TargetError as the first pass does).
RunDcmsend = Callable[[Path, Path, Sequence[str]], bytes]


def _needs_us(syntax: str) -> bool:
    """A syntax dcmsend cannot decode but ``blocks._transcode`` can."""
    return syntax in DECODERS and syntax not in DCMTK_DECODES


def conversion_args(conversion: Conversion, folder: Path, names: Iterable[Path]) -> list[str]:
    """dcmsend's options for ``conversion`` over the files ``names`` in ``folder``.

    ``-dn -nh`` for ``never``; ``+dly`` otherwise, and ``-nh`` when some file may need the
    second pass (without it, dcmsend stops at the first file it cannot send).
    """
    if not conversion.convert:
        return ["-dn", "-nh"]  # go on past a refused file, so the report names each one
    args = ["+dly"]
    for name in names:
        try:
            syntax = str(read_file_meta_info(folder / name).get("TransferSyntaxUID", ""))
        except Exception:  # noqa: S112 - not DICOM: dcmsend reports it itself
            continue
        if _needs_us(syntax):
            return [*args, "-nh"]
    return args


def _value(line: str) -> str:
    return line.partition(":")[2].strip()


def _uid(value: str) -> str:
    return value.split(" = ", 1)[0].strip()


def _instance(fields: dict[str, str]) -> InstanceResult:
    status_text = fields.get("DIMSE Status", "")
    word = status_text.split(" ", 1)[0]
    status = int(word, 16) if word.lower().startswith("0x") else None
    network = _uid(fields.get("Network Xfer", ""))
    size = fields.get("Dataset Size", "0").split()[0]
    return InstanceResult(
        path=Path(fields.get("Filename", "")),
        sop_class_uid=_uid(fields.get("SOP Class", "")),
        sop_instance_uid=fields.get("SOP Instance", ""),
        transfer_syntax=_uid(fields.get("Original Xfer", "")),
        size=int(size) if size.isdigit() else 0,
        status=status,
        association=int(fields.get("Association", "0") or 0),
        context_id=int(fields.get("Pres. Context", "0") or 0) or None,
        network_transfer_syntax=network or None,
        error=None if status is not None else status_text,
        no_context=status_text == _NO_CONTEXT,
        request_sent=status is not None,
    )


def parse_instances(text: str) -> StoreResult:
    """A dcmsend report as the per-instance result ``format_report`` writes back unchanged."""
    header: dict[str, str] = {}
    instances: list[InstanceResult] = []
    fields: dict[str, str] = {}
    associations = contexts = 0
    for line in text.splitlines():
        key = line.partition(":")[0].strip()
        if key in ("Communication Peer", "AE Titles used", "Current Date/Time"):
            header[key] = _value(line)
        elif key == "Number" and line.startswith("Number        :"):
            fields = {}
        elif key == "DIMSE Status":
            fields[key] = _value(line)
            instances.append(_instance(fields))
        elif key == "Number of associations":
            associations = int(_value(line))
        elif key == "Number of pres. contexts":
            contexts = int(_value(line))
        elif key:
            fields[key] = _value(line)
    calling, _, called = header.get("AE Titles used", "").partition(" -> ")
    try:
        started = datetime.strptime(header.get("Current Date/Time", ""), "%Y-%m-%d %H:%M:%S")
    except ValueError:
        started = datetime.now()
    return StoreResult(
        peer=header.get("Communication Peer", ""),
        calling_aet=calling.strip(),
        called_aet=called.strip(),
        started=started,
        instances=instances,
        associations=associations,
        presentation_contexts=contexts,
    )


def refused_for_syntax(result: StoreResult) -> list[InstanceResult]:
    """Instances dcmsend could not send for their syntax and that we can decode."""
    return [
        i
        for i in result.instances
        if i.no_context and not is_uncompressed(i.transfer_syntax) and i.transfer_syntax in DECODERS
    ]


def second_pass(
    report: bytes,
    case_root: Path,
    snapshot: Path,
    private: Path,
    conversion: Conversion,
    run: RunDcmsend,
    label: str,
) -> bytes:
    """``report`` (the first pass's, with the case's paths), completed by a second pass over the
    refused files decoded into ``private``; unchanged when nothing was refused for its syntax.

    A file that cannot be decoded is a ``PermanentTargetError`` naming it and its syntax.
    """
    first = parse_instances(report.decode("utf-8", errors="replace"))
    refused = refused_for_syntax(first)
    if not conversion.convert or not refused:
        return report
    decoded = private / "decoded"
    decoded.mkdir(mode=0o700)
    snapshot_files = CaseFiles(snapshot)
    for instance in refused:
        rel = Path(instance.path).relative_to(case_root)
        (decoded / rel).parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        try:
            with snapshot_files.open(rel) as source, open_new(decoded / rel, 0o600) as out:
                write_decoded(
                    source, rel.name, instance.transfer_syntax, out, conversion.max_decoded_bytes
                )
        except ConversionError as exc:
            raise PermanentTargetError(f"{label}: {exc}") from None
    raw = run(decoded, private / "report-decoded.txt", ["-nh"])
    raw = raw.replace(os.fsencode(decoded), os.fsencode(case_root))
    second = parse_instances(raw.decode("utf-8", errors="replace"))
    return format_report(_merge(first, second)).encode("utf-8")


def refusal_error(
    report: bytes, conversion: Conversion, label: str, stderr: str = ""
) -> PermanentTargetError | None:
    """The error naming the first file the peer took in none of the syntaxes it was offered
    in (with ``convert="never"``, or in a syntax nothing here decodes), or ``None``.

    With ``-dn`` dcmsend proposes a compressed file's context, sees it rejected and reports the
    file ``<not sent>``, saying why (a bad presentation context ID) only on ``stderr``.
    """
    result = parse_instances(report.decode("utf-8", errors="replace"))
    rejected = not conversion.convert and _CONTEXT_REJECTED in stderr
    refused = [
        i
        for i in result.instances
        if i.no_context
        or (rejected and i.status is None and not is_uncompressed(i.transfer_syntax))
    ]
    if not refused:
        return None
    first = refused[0]
    sop = UID(first.sop_class_uid).name if first.sop_class_uid else "its SOP class"
    why = " (convert: never)" if not conversion.convert else ""
    if conversion.convert and not is_uncompressed(first.transfer_syntax):
        why = " (no decoder for it here)" if first.transfer_syntax not in DECODERS else ""
    return PermanentTargetError(
        f"{label}: {len(refused)} of {len(result.instances)} instances refused: "
        f"{Path(first.path).name}: no accepted presentation context for {sop} in "
        f"{syntax_name(first.transfer_syntax)}{why}"
    )


def _merge(first: StoreResult, second: StoreResult) -> StoreResult:
    """``first`` with each instance sent again in ``second`` replaced by that one (its original
    syntax kept, its association numbered after the first pass's)."""
    originals = {Path(i.path): i.transfer_syntax for i in first.instances}
    again = {
        Path(i.path): replace(
            i,
            transfer_syntax=originals.get(Path(i.path), i.transfer_syntax),
            association=i.association + first.associations if i.association else 0,
        )
        for i in second.instances
    }
    return replace(
        first,
        instances=[again.get(Path(i.path), i) for i in first.instances],
        associations=first.associations + second.associations,
        presentation_contexts=first.presentation_contexts + second.presentation_contexts,
    )
