"""dcmsend-compatible transfer reports (``sent.txt``) for sends done with ``blocks._dimse``.

mercure's DICOM target runs ``dcmsend ... +crf <case>/sent.txt`` and then decides success by
parsing that file; operators and scripts read it too. To stay a drop-in replacement, a case we
send gets the same file, in DCMTK 3.6.7's exact layout (checked line by line against the real
``dcmsend`` in the tests), and ``parse_report`` reproduces mercure's parser, quirks included.

Pure functions, no I/O except ``write_report``.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydicom.uid import UID

from tasks.safefiles import replace_file

if TYPE_CHECKING:
    from blocks._dimse_results import InstanceResult, StoreResult

__all__ = [
    "dcmtk_status_text",
    "dcmtk_summary_bucket",
    "format_report",
    "parse_report",
    "write_report",
]

# DcmXfer names of DCMTK 3.6.7 (dcmdata/libsrc/dcxfer.cc), which differ from pydicom's.
_XFER_NAMES: dict[str, str] = {
    "1.2.840.10008.1.2": "Little Endian Implicit",
    "1.2.840.10008.1.2.1": "Little Endian Explicit",
    "1.2.840.10008.1.2.2": "Big Endian Explicit",
    "1.2.840.10008.1.2.4.50": "JPEG Baseline",
    "1.2.840.10008.1.2.4.51": "JPEG Extended, Process 2+4",
    "1.2.840.10008.1.2.4.52": "JPEG Extended, Process 3+5",
    "1.2.840.10008.1.2.4.53": "JPEG Spectral Selection, Non-hierarchical, Process 6+8",
    "1.2.840.10008.1.2.4.54": "JPEG Spectral Selection, Non-hierarchical, Process 7+9",
    "1.2.840.10008.1.2.4.55": "JPEG Full Progression, Non-hierarchical, Process 10+12",
    "1.2.840.10008.1.2.4.56": "JPEG Full Progression, Non-hierarchical, Process 11+13",
    "1.2.840.10008.1.2.4.57": "JPEG Lossless, Non-hierarchical, Process 14",
    "1.2.840.10008.1.2.4.58": "JPEG Lossless, Non-hierarchical, Process 15",
    "1.2.840.10008.1.2.4.59": "JPEG Extended, Hierarchical, Process 16+18",
    "1.2.840.10008.1.2.4.60": "JPEG Extended, Hierarchical, Process 17+19",
    "1.2.840.10008.1.2.4.61": "JPEG Spectral Selection, Hierarchical, Process 20+22",
    "1.2.840.10008.1.2.4.62": "JPEG Spectral Selection, Hierarchical, Process 21+23",
    "1.2.840.10008.1.2.4.63": "JPEG Full Progression, Hierarchical, Process 24+26",
    "1.2.840.10008.1.2.4.64": "JPEG Full Progression, Hierarchical, Process 25+27",
    "1.2.840.10008.1.2.4.65": "JPEG Lossless, Hierarchical, Process 28",
    "1.2.840.10008.1.2.4.66": "JPEG Lossless, Hierarchical, Process 29",
    "1.2.840.10008.1.2.4.70": "JPEG Lossless, Non-hierarchical, 1st Order Prediction",
    "1.2.840.10008.1.2.5": "RLE Lossless",
    "1.2.840.10008.1.2.1.99": "Deflated Explicit VR Little Endian",
    "1.2.840.10008.1.2.4.80": "JPEG-LS Lossless",
    "1.2.840.10008.1.2.4.81": "JPEG-LS Lossy (Near-lossless)",
    "1.2.840.10008.1.2.4.90": "JPEG 2000 (Lossless only)",
    "1.2.840.10008.1.2.4.91": "JPEG 2000 (Lossless or Lossy)",
    "1.2.840.10008.1.2.4.92": "JPEG 2000 Part 2 Multicomponent Image Compression (Lossless only)",
    "1.2.840.10008.1.2.4.93": (
        "JPEG 2000 Part 2 Multicomponent Image Compression (Lossless or Lossy)"
    ),
    "1.2.840.10008.1.2.4.94": "JPIP Referenced",
    "1.2.840.10008.1.2.4.95": "JPIP Referenced Deflate",
    "1.2.840.10008.1.2.4.100": "MPEG2 Main Profile @ Main Level",
    "1.2.840.10008.1.2.4.101": "MPEG2 Main Profile @ High Level",
    "1.2.840.10008.1.2.4.102": "MPEG-4 AVC/H.264 High Profile / Level 4.1",
    "1.2.840.10008.1.2.4.103": "MPEG-4 AVC/H.264 BD-compatible High Profile / Level 4.1",
    "1.2.840.10008.1.2.4.104": "MPEG-4 AVC/H.264 High Profile / Level 4.2 For 2D Video",
    "1.2.840.10008.1.2.4.105": "MPEG-4 AVC/H.264 High Profile / Level 4.2 For 3D Video",
    "1.2.840.10008.1.2.4.106": "MPEG-4 AVC/H.264 Stereo High Profile / Level 4.2",
    "1.2.840.10008.1.2.4.107": "HEVC/H.265 Main Profile / Level 5.1",
    "1.2.840.10008.1.2.4.108": "HEVC/H.265 Main 10 Profile / Level 5.1",
    "1.2.840.113619.5.2": "Private GE Little Endian Implicit with big endian pixel data",
}
_UNKNOWN_XFER = "Unknown Transfer Syntax"

# dcmFindNameOfUID() names where DCMTK 3.6.7 differs from pydicom's UID keywords.
_SOP_CLASS_NAMES: dict[str, str] = {
    "1.2.840.10008.5.1.4.1.1.7.1": "MultiframeSingleBitSecondaryCaptureImageStorage",
    "1.2.840.10008.5.1.4.1.1.7.2": "MultiframeGrayscaleByteSecondaryCaptureImageStorage",
    "1.2.840.10008.5.1.4.1.1.7.3": "MultiframeGrayscaleWordSecondaryCaptureImageStorage",
    "1.2.840.10008.5.1.4.1.1.7.4": "MultiframeTrueColorSecondaryCaptureImageStorage",
    "1.2.840.10008.5.1.4.1.1.3.1": "UltrasoundMultiframeImageStorage",
    "1.2.840.10008.5.1.4.1.1.3": "RETIRED_UltrasoundMultiframeImageStorage",
    "1.2.840.10008.5.1.4.1.1.6": "RETIRED_UltrasoundImageStorage",
    "1.2.840.10008.5.1.4.1.1.5": "RETIRED_NuclearMedicineImageStorage",
    "1.2.840.10008.5.1.4.1.1.12.3": "RETIRED_XRayAngiographicBiPlaneImageStorage",
    "1.2.840.10008.5.1.4.1.1.8": "RETIRED_StandaloneOverlayStorage",
    "1.2.840.10008.5.1.4.1.1.9": "RETIRED_StandaloneCurveStorage",
    "1.2.840.10008.5.1.4.1.1.10": "RETIRED_StandaloneModalityLUTStorage",
    "1.2.840.10008.5.1.4.1.1.11": "RETIRED_StandaloneVOILUTStorage",
    "1.2.840.10008.5.1.4.1.1.129": "RETIRED_StandalonePETCurveStorage",
    "1.2.840.10008.5.1.4.1.1.27": "RETIRED_StoredPrintStorage",
    "1.2.840.10008.5.1.4.1.1.29": "RETIRED_HardcopyGrayscaleImageStorage",
    "1.2.840.10008.5.1.4.1.1.30": "RETIRED_HardcopyColorImageStorage",
    "1.2.840.10008.5.1.4.1.1.77.1": "RETIRED_VLImageStorage",
    "1.2.840.10008.5.1.4.1.1.77.2": "RETIRED_VLMultiframeImageStorage",
    "1.2.840.10008.5.1.4.1.1.88.33": "ImplantationPlanSRDocumentStorage",
}


def _xfer_name(uid: str) -> str:
    return _XFER_NAMES.get(uid, _UNKNOWN_XFER)


def _sop_class_name(uid: str) -> str:
    if uid in _SOP_CLASS_NAMES:
        return _SOP_CLASS_NAMES[uid]
    keyword = UID(uid).keyword if uid else ""
    return keyword or "unknown"


def dcmtk_status_text(code: int) -> str:
    """DCMTK 3.6.7 ``DU_cstoreStatusString()``, as verified against dcmsend in the tests."""
    exact = {
        0x0000: "Success",
        0x0122: "Refused: SOPClassNotSupported",
        0xB000: "Warning: CoercionOfDataElements",
        0xB007: "Warning: DataSetDoesNotMatchSOPClass",
        0xB006: "Warning: ElementsDiscarded",
    }
    if code in exact:
        return exact[code]
    if code & 0xFF00 == 0xA700:
        return "Refused: OutOfResources"
    if code & 0xFF00 == 0xA900:
        return "Error: DataSetDoesNotMatchSOPClass"
    if code & 0xF000 == 0xC000:
        return "Error: CannotUnderstand"
    return f"Unknown Status: 0x{code:x}"


def dcmtk_summary_bucket(code: int) -> str:
    """Which summary line dcmsend 3.6.7 counts a sent instance under.

    ``"REFUSED"``, ``"ERROR"``, ``"WARNING"``, ``"SUCCESS"`` or ``"unknown"``, in DCMTK's order
    of checks (``DcmStorageSCU::getStatusSummary``), e.g. 0x0001, 0x0107 and 0x0116 are
    warnings, 0xA800 and 0x0124 are "unknown".
    """
    if code & 0xFF00 == 0xA700 or code == 0x0122:
        return "REFUSED"
    if code & 0xFF00 == 0xA900 or code & 0xF000 == 0xC000:
        return "ERROR"
    if code & 0xF000 == 0xB000 or code in (0x0001, 0x0107, 0x0116):
        return "WARNING"
    if code == 0x0000:
        return "SUCCESS"
    return "unknown"


def _dimse_status(instance: InstanceResult) -> str:
    if instance.no_context:
        return "<no acceptable presentation context>"
    if instance.status is None:
        return "<not sent>"
    return f"0x{instance.status:04x} ({dcmtk_status_text(instance.status)})"


def _instance_block(number: int, instance: InstanceResult) -> list[str]:
    network = instance.network_transfer_syntax
    network_text = f"{network} = {_xfer_name(network)}" if network else ""
    return [
        f"Number        : {number}",
        f"Filename      : {instance.path}",
        f"SOP Instance  : {instance.sop_instance_uid}",
        f"SOP Class     : {instance.sop_class_uid} = {_sop_class_name(instance.sop_class_uid)}",
        f"Original Xfer : {instance.transfer_syntax} = {_xfer_name(instance.transfer_syntax)}",
        f"Dataset Size  : {instance.size} bytes",
        f"Association   : {instance.association}",
        f"Pres. Context : {instance.context_id or 0}",
        f"Network Xfer  : {network_text}",
        f"DIMSE Status  : {_dimse_status(instance)}",
        "",
    ]


def _summary(result: StoreResult) -> list[str]:
    """DCMTK's status summary; an instance without a response counts as not sent."""
    buckets = {"SUCCESS": 0, "WARNING": 0, "ERROR": 0, "REFUSED": 0, "unknown": 0}
    no_context = 0
    for instance in result.instances:
        if instance.no_context:
            no_context += 1
        elif instance.status is not None:
            buckets[dcmtk_summary_bucket(instance.status)] += 1
    sent = sum(buckets.values())
    total = len(result.instances)
    lines = [
        "Status Summary",
        "--------------",
        f"Number of associations   : {result.associations}",
        f"Number of pres. contexts : {result.presentation_contexts}",
        f"Number of SOP instances  : {total}",
    ]
    optional = [
        ("- sent to the peer       : ", sent),
        ("  * with status SUCCESS  : ", buckets["SUCCESS"]),
        ("  * with status WARNING  : ", buckets["WARNING"]),
        ("  * with status ERROR    : ", buckets["ERROR"]),
        ("  * with status REFUSED  : ", buckets["REFUSED"]),
        ("  * with unknown status  : ", buckets["unknown"]),
        ("- NOT sent to the peer   : ", total - sent),
        ("  * no acceptable pres.  : ", no_context),
    ]
    lines += [f"{label}{count}" for label, count in optional if count > 0]
    return lines


def format_report(result: StoreResult) -> str:
    """The text ``dcmsend +crf`` would write for this transfer (no trailing newline, as DCMTK).

    Instances that got no response are reported ``<not sent>`` and counted under
    ``- NOT sent to the peer``, so mercure's success rule (SOP instances == SUCCESS) fails.
    """
    lines = [
        "Detailed Report on the Transfer of Instances",
        "============================================",
        "",
        f"Communication Peer : {result.peer}",
        f"AE Titles used     : {result.calling_aet} -> {result.called_aet}",
        f"Current Date/Time  : {result.started:%Y-%m-%d %H:%M:%S}",
        "",
        "",
    ]
    for number, instance in enumerate(result.instances, start=1):
        lines += _instance_block(number, instance)
    lines.append("")
    lines += _summary(result)
    return "\n".join(lines)


def _parse_header(header: list[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for line in header:
        if line.startswith("Communication Peer"):
            out["communication_peer"] = line.split(":")[1].strip()
        elif line.startswith("AE Titles used"):
            out["ae_titles_used"] = line.split(":")[1].strip()
        elif line.startswith("Current Date/Time"):
            out["current_datetime"] = line.split(":", 1)[1].strip()
    return out


def _parse_summary(summary: list[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for line in summary:
        if line.startswith("Number of SOP instances"):
            out["sop_instances"] = int(line.split(":")[1])
        elif line.startswith("- sent to the peer"):
            out["sent_to_peer"] = int(line.split(":")[1])
        elif line.startswith("  * with status SUCCESS"):
            out["successful"] = int(line.split(":")[1])
        elif line.startswith("  * with status ERROR"):
            out["error"] = int(line.split(":")[1])
    return out


def parse_report(text: str) -> dict[str, Any]:
    """mercure's ``process_dcmsend_result.parse()`` on report text, quirks kept.

    ``{"summary": {...}, "header": {...}}``; the header is looked for in the first 8 lines only,
    ``communication_peer`` loses the port (split on every ``:``), WARNING/REFUSED/NOT-sent lines
    are ignored, and leading whitespace matters. Raises ``ValueError("Failed to parse dcmsend
    result.")`` without a ``Status Summary`` line (mercure raises a bare Exception).
    """
    content = io.StringIO(text, newline=None).readlines()  # as mercure's open().readlines()
    for index, line in enumerate(content):
        if line.startswith("Status Summary"):
            summary_start = index
            break
    else:
        raise ValueError("Failed to parse dcmsend result.")
    return {
        "summary": _parse_summary(content[summary_start:]),
        "header": _parse_header(content[:8]),
    }


def write_report(path: Path, result: StoreResult) -> Path:
    """Write ``format_report(result)`` to ``path`` atomically and never through a link planted
    in the case folder (``replace_file``: a new random name beside it, then a rename)."""
    path = Path(path)
    data = format_report(result).encode("utf-8")
    replace_file(path, data, mode=0o644, fsync=True)  # dcmsend's report is world-readable
    return path
