"""The DCMTK ``dcmsend`` backend of a DICOM target: mercure's own way of sending a case.

A ``DicomTarget`` with ``backend="dcmsend"`` runs DCMTK's ``dcmsend`` once per (case, target)
with mercure's arguments, in mercure's order::

    dcmsend <ip> <port> +r +sd <case folder> -aet <calling> -aec <called> -nuc +sp *.dcm
            -to <connect timeout> +crf <report> -ta <ACSE timeout> -td <DIMSE timeout>

and decides as mercure does: the report must exist and parse (``blocks._dcmsend_report``) and
every SOP instance must have status SUCCESS (or WARNING, when warnings count as sent). What
mercure only logs is translated into the error tree instead: dcmsend's exit code and its last
fatal message become a one-line :class:`TransientTargetError` or :class:`PermanentTargetError`.

* The binary is DCMTK's by absolute path: pynetdicom installs look-alike scripts into a
  virtualenv's ``bin/`` that would shadow it on ``PATH``.
* ``TCP_NODELAY=1`` is set in dcmsend's environment (DCMTK leaves Nagle on otherwise, which
  costs ≈ 40 ms per C-STORE against a peer that delays its ACKs).
* dcmsend opens files by name, so it never sees the case folder: it sends a private snapshot
  (``blocks._snapshot``: hard links checked to be the files opened without
  following a link, or copies), so a link planted in the case at any time is neither followed
  nor sent. Its report is written in a private folder too (a name in the case folder could be
  a planted link, which dcmsend's ``fopen`` would follow) and copied into the case with
  ``replace_file``, with the snapshot's paths put back to the case's, so a reader never sees half
  a report.
* dcmsend enforces the connect, ACSE and DIMSE timeouts itself; the process as a whole gets a
  generous limit on top (bytes at a slow rate plus the timeouts) and is killed after it.

Prefect-free, like ``blocks._dimse``.
"""

from __future__ import annotations

import logging
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from blocks._dcmsend_convert import conversion_args, refusal_error, second_pass
from blocks._dcmsend_report import parse_report
from blocks._dimse_results import Unstored, store_failure_is_transient, stored
from blocks._snapshot import case_snapshot
from blocks._transcode import Conversion
from blocks.errors import PermanentTargetError, TargetError, TransientTargetError
from tasks.safefiles import CaseFiles, replace_file

if TYPE_CHECKING:
    from blocks._association import DicomPeer

__all__ = [
    "DCMSEND_ERROR_CODES",
    "DcmsendResult",
    "ReportDetails",
    "dcmsend_command",
    "find_dcmsend",
    "parse_report_details",
    "send_case",
]

LOGGER = logging.getLogger(__name__)

#: dcmsend's exit codes as mercure names them (``DCMSEND_ERROR_CODES``).
DCMSEND_ERROR_CODES: dict[int, str] = {
    1: "EXITCODE_COMMANDLINE_SYNTAX_ERROR",
    21: "EXITCODE_NO_INPUT_FILES",
    22: "EXITCODE_INVALID_INPUT_FILE",
    23: "EXITCODE_NO_VALID_INPUT_FILES",
    43: "EXITCODE_CANNOT_WRITE_REPORT_FILE",
    60: "EXITCODE_CANNOT_INITIALIZE_NETWORK",
    61: "EXITCODE_CANNOT_NEGOTIATE_ASSOCIATION",
    62: "EXITCODE_CANNOT_SEND_REQUEST",
    65: "EXITCODE_CANNOT_ADD_PRESENTATION_CONTEXT",
}
#: The input is wrong: the same folder fails the same way next time.
_BAD_INPUT = {1, 21, 22, 23, 65}
#: The slowest transfer rate (bytes/s) the process-level time limit allows for.
SLOWEST_RATE = 100_000
_NO_CONTEXT = "<no acceptable presentation context>"


def find_dcmsend() -> str | None:
    """DCMTK's ``dcmsend``: ``/usr/bin/dcmsend``, else on ``PATH`` outside this virtualenv."""
    candidate = Path("/usr/bin/dcmsend")
    if candidate.is_file() and os.access(candidate, os.X_OK):
        return str(candidate)
    venv_bin = Path(sys.prefix) / "bin"
    path = os.pathsep.join(
        p
        for p in os.environ.get("PATH", "").split(os.pathsep)
        if p and Path(p).resolve() != venv_bin.resolve()
    )
    found = shutil.which("dcmsend", path=path)
    return found if found and Path(found).parent.resolve() != venv_bin.resolve() else None


def _whole_seconds(value: float) -> str:
    """dcmsend takes integer seconds; never 0 (that would mean something else)."""
    return str(max(1, math.ceil(value)))


def dcmsend_command(
    binary: str,
    case_dir: Path,
    host: str,
    port: int,
    called_aet: str,
    calling_aet: str,
    report: Path,
    *,
    connect_timeout: float,
    acse_timeout: float,
    dimse_timeout: float,
    extra: Sequence[str] = (),
) -> list[str]:
    """mercure's dcmsend command line, plus DCMTK's ACSE and DIMSE timeouts, plus ``extra``
    (the conversion options, ``blocks._dcmsend_convert``)."""
    command = [binary, host, str(port), "+r", "+sd", str(case_dir)]
    if calling_aet:
        command += ["-aet", calling_aet]
    if called_aet:
        command += ["-aec", called_aet]
    command += ["-nuc", "+sp", "*.dcm", "-to", _whole_seconds(connect_timeout)]
    command += ["+crf", str(report)]
    command += ["-ta", _whole_seconds(acse_timeout), "-td", _whole_seconds(dimse_timeout)]
    return command + list(extra)


@dataclass
class ReportDetails:
    """What mercure's parser ignores but a decision needs: warnings and per-instance statuses."""

    associations: int = 0
    warnings: int = 0
    dataset_bytes: int = 0
    #: (file name, DIMSE status text) per instance, in the report's order.
    statuses: list[tuple[str, str]] = field(default_factory=list)


def parse_report_details(text: str) -> ReportDetails:
    """Warning count, association count, dataset sizes and statuses of a dcmsend report."""
    out = ReportDetails()
    filename = ""
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if not sep:
            continue
        value = value.strip()
        if line.startswith("Filename      :"):
            filename = value
        elif line.startswith("Dataset Size  :"):
            number = value.split()[0] if value else ""
            out.dataset_bytes += int(number) if number.isdigit() else 0
        elif line.startswith("DIMSE Status  :"):
            out.statuses.append((filename, value))
            filename = ""
        elif line.startswith("  * with status WARNING"):
            out.warnings = int(value)
        elif line.startswith("Number of associations"):
            out.associations = int(value)
    return out


def _status_code(text: str) -> int | None:
    """``0xa700`` of ``0xa700 (Refused: OutOfResources)``; None for ``<not sent>`` and the like."""
    word = text.split(" ", 1)[0]
    try:
        return int(word, 16) if word.lower().startswith("0x") else None
    except ValueError:
        return None


def _unstored(text: str) -> Unstored:
    """An instance of the report that was not stored, for the shared judge (``_dimse_results``):
    ``<not sent>`` and the like have no status (as a lost response)."""
    return Unstored(_status_code(text), no_context=text == _NO_CONTEXT)


def _last_message(stderr: str) -> str:
    """dcmsend's last fatal line (``F: ...``), else its last error (``E: ...``), one line."""
    lines = [line.strip() for line in stderr.splitlines() if line.strip()]
    for prefix in ("F: ", "E: "):
        picked = [line[len(prefix) :] for line in lines if line.startswith(prefix)]
        if picked:
            return " ".join(picked[-1].split())[:300]
    return " ".join(lines[-1].split())[:300] if lines else "no message"


def _exit_error(code: int, stderr: str, label: str) -> TargetError:
    """The error for a non-zero exit (mercure §5.3 codes)."""
    name = DCMSEND_ERROR_CODES.get(code, "unknown exit code")
    message = f"{label}: dcmsend failed ({name}, exit {code}): {_last_message(stderr)}"
    lowered = stderr.lower()
    if code in _BAD_INPUT or code == 43:
        return PermanentTargetError(message)
    if code == 61 and "rejected" in lowered:
        return PermanentTargetError(message)
    if code == 62 and "presentation context" in lowered:
        return PermanentTargetError(message)
    return TransientTargetError(message)


@dataclass(frozen=True)
class DcmsendResult:
    """A transfer dcmsend reported as complete."""

    instances: int
    successful: int
    warnings: int
    associations: int
    dataset_bytes: int
    report: str
    elapsed: float


def send_case(
    case: CaseFiles,
    peer: DicomPeer,
    *,
    report_path: Path | None,
    files: Sequence[Path],
    warnings_ok: bool = True,
    label: str = "",
    binary: str | None = None,
    conversion: Conversion | None = None,
) -> DcmsendResult:
    """Send ``files`` (the ``*.dcm`` files of ``case``) with dcmsend; raise a TargetError unless
    all arrived.

    ``report_path`` receives dcmsend's report (replacing an earlier one) whenever dcmsend wrote
    one; with ``None`` the report is not kept. A file that is a link (or became one) is a
    ``PermanentTargetError`` naming it, and nothing is sent. Files the peer refused in a syntax
    dcmsend cannot decode go in a second pass, decoded (``blocks._dcmsend_convert``).
    """
    label = label or peer.describe()
    conversion = conversion or Conversion()
    found = binary or find_dcmsend()
    if found is None:
        raise PermanentTargetError(
            f"{label}: DCMTK dcmsend not found (install DCMTK, e.g. the Debian package 'dcmtk')"
        )
    names = [path.relative_to(case.root) if path.is_absolute() else path for path in files]
    with (
        tempfile.TemporaryDirectory(prefix="dicom-dispatch-dcmsend-") as private,
        case_snapshot(case, names, label) as snapshot,
    ):
        stderr: list[str] = []

        def run(folder: Path, report: Path, extra: Sequence[str]) -> bytes:
            return _run(found, folder, report, peer, label, extra, stderr)

        started = time.monotonic()
        raw = run(
            snapshot, Path(private) / "report.txt", conversion_args(conversion, snapshot, names)
        )
        # The report names the files as the case holds them, not as the snapshot did.
        raw = raw.replace(os.fsencode(snapshot), os.fsencode(case.root))
        raw = second_pass(raw, case.root, snapshot, Path(private), conversion, run, label)
        elapsed = time.monotonic() - started
        if report_path is not None:
            replace_file(report_path, raw)
        refused = refusal_error(raw, conversion, label, "".join(stderr))
        if refused is not None:
            raise refused
        return _judge(raw.decode("utf-8", errors="replace"), warnings_ok, label, elapsed)


def _run(
    binary: str,
    folder: Path,
    report: Path,
    peer: DicomPeer,
    label: str,
    extra: Sequence[str],
    stderr: list[str],
) -> bytes:
    """One dcmsend run over the ``*.dcm`` files of ``folder``: its report (what it printed is
    added to ``stderr``), or a TargetError."""
    command = dcmsend_command(
        binary,
        folder,
        peer.host,
        peer.port,
        peer.called_aet,
        peer.calling_aet,
        report,
        connect_timeout=peer.connect_timeout,
        acse_timeout=peer.acse_timeout,
        dimse_timeout=peer.dimse_timeout,
        extra=extra,
    )
    size = sum(p.stat().st_size for p in folder.rglob("*.dcm") if p.is_file())
    limit = peer.connect_timeout + 2 * peer.acse_timeout + 2 * peer.dimse_timeout
    limit += size / SLOWEST_RATE
    env = dict(os.environ, TCP_NODELAY="1")
    try:
        proc = subprocess.run(
            command,
            env=env,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            errors="replace",
            timeout=limit,
            check=False,
        )
    except subprocess.TimeoutExpired as exc:
        raise TransientTargetError(
            f"{label}: dcmsend did not finish within {limit:.0f} s and was stopped"
        ) from exc
    except OSError as exc:
        raise PermanentTargetError(f"{label}: cannot run {binary}: {exc}") from exc
    stderr.append(proc.stderr)
    if proc.returncode != 0:
        LOGGER.warning("Failed command: %s (exit %d)", command, proc.returncode)
        raise _exit_error(proc.returncode, proc.stderr, label)
    try:
        return report.read_bytes()
    except OSError as exc:
        raise TransientTargetError(
            f"{label}: dcmsend exited 0 but wrote no report ({exc.strerror})"
        ) from exc


def _judge(text: str, warnings_ok: bool, label: str, elapsed: float) -> DcmsendResult:
    """mercure's success rule on the report, with warnings counted when ``warnings_ok``."""
    try:
        summary = parse_report(text)["summary"]
    except ValueError as exc:
        raise TransientTargetError(f"{label}: dcmsend's report cannot be parsed: {exc}") from exc
    details = parse_report_details(text)
    total = int(summary.get("sop_instances", 0))
    successful = int(summary.get("successful", 0))
    accepted = successful + (details.warnings if warnings_ok else 0)
    if total == 0 or accepted != total:
        failed = [(n, s) for n, s in details.statuses if not stored(_status_code(s), warnings_ok)]
        first = f" (first failure: {Path(failed[0][0]).name}: {failed[0][1]})" if failed else ""
        message = f"{label}: only {accepted} out of {total} instances were sent successfully{first}"
        transient = store_failure_is_transient(_unstored(s) for _, s in failed)
        raise (TransientTargetError if transient else PermanentTargetError)(message)
    return DcmsendResult(
        instances=total,
        successful=successful,
        warnings=details.warnings,
        associations=details.associations,
        dataset_bytes=details.dataset_bytes,
        report=text,
        elapsed=elapsed,
    )
