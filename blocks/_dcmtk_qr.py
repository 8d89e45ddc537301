"""DCMTK ``getscu``/``movescu`` as the retrieve backend, for sites where the pure-Python
receiver is too slow.

The tools are found by absolute path (pynetdicom installs same-named tools into the venv); their
files go through the same checks and naming (:class:`~blocks._receiver.Receiver`) as the
pynetdicom backend's, and their log is parsed for the final status and the failed
sub-operations. Prefect-free.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import subprocess
import sys
import threading
from collections.abc import Sequence
from pathlib import Path

from blocks._association import DicomPeer
from blocks._receiver import Receiver
from blocks.errors import PermanentTargetError, TransientTargetError
from blocks.qr import RetrieveItem

__all__ = ["dcmtk_retrieve", "dcmtk_tool"]


def dcmtk_tool(name: str) -> str | None:
    """DCMTK's ``getscu``/``movescu`` by absolute path (never pynetdicom's same-named apps)."""
    for folder in ("/usr/bin", "/usr/local/bin"):
        candidate = Path(folder) / name
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    venv_bin = str(Path(sys.prefix) / "bin")
    path = os.pathsep.join(
        p for p in os.environ.get("PATH", "").split(os.pathsep) if p and p != venv_bin
    )
    return shutil.which(name, path=path)


_DCMTK_RESPONSE = re.compile(r"Received (?:Final )?(?:C-GET|Move) Response(?: \d+)? \(([^)]*)\)")
_DCMTK_FAILED = re.compile(r"Number of Failed Suboperations\s*:\s*(\d+)")


def _dcmtk_outcome(output: str) -> tuple[str | None, int]:
    """(last response status text, failed sub-operations) from getscu/movescu ``-v`` output."""
    statuses = _DCMTK_RESPONSE.findall(output)
    failed = _DCMTK_FAILED.findall(output)
    return (statuses[-1] if statuses else None), (int(failed[-1]) if failed else 0)


def _dcmtk_args(
    tool: str,
    peer: DicomPeer,
    item: RetrieveItem,
    staging: Path,
    method: str,
    move_aet: str,
    listen: tuple[str, int],
) -> list[str]:
    args = [
        tool,
        "-S",
        "-aet",
        peer.calling_aet,
        "-aec",
        peer.called_aet,
        "-to",
        str(max(1, int(peer.connect_timeout))),
        "-ta",
        str(max(1, int(peer.acse_timeout))),
        "-td",
        str(max(1, int(peer.dimse_timeout))),
        "-pdu",
        "131072",
        "+B",  # bit-preserving: the objects as the peer sent them
        "-v",  # per-object responses, the final status and counts: parsed
        "-od",
        str(staging),
        "-k",
        f"QueryRetrieveLevel={'SERIES' if item.series_uid else 'STUDY'}",
        "-k",
        f"StudyInstanceUID={item.study_uid}",
    ]
    if item.series_uid:
        args += ["-k", f"SeriesInstanceUID={item.series_uid}"]
    if method == "move":
        args += ["-aem", move_aet, "--port", str(listen[1])]
    return [*args, peer.host, str(peer.port)]


def _run_tool(args: list[str], folder: Path, timeout: float) -> tuple[int, str]:
    """Run getscu/movescu in ``folder``; (exit code, its log).

    The files are checked only once the tool has exited: checking them while it runs was
    measured slower here (the checks and the transfer compete for the same cores).
    """
    try:
        done = subprocess.run(
            args,
            env={**os.environ, "TCP_NODELAY": "1"},
            cwd=folder,  # movescu 3.6.7 with +B writes to the working directory, not -od
            capture_output=True,
            text=True,
            errors="replace",
            timeout=timeout,
        )
    except subprocess.TimeoutExpired as exc:
        raise TransientTargetError(
            f"{Path(args[0]).name} did not finish within {timeout:g} s"
        ) from exc
    return done.returncode, done.stdout + done.stderr


def _take(folder: Path, receiver: Receiver) -> None:
    with os.scandir(folder) as entries:
        files = sorted(Path(e.path) for e in entries if e.is_file(follow_symlinks=False))
    for path in files:
        receiver.adopt(path)


def dcmtk_retrieve(
    peer: DicomPeer,
    items: Sequence[RetrieveItem],
    receiver: Receiver,
    method: str,
    move_aet: str,
    listen: tuple[str, int],
    staging: Path,
) -> int:
    """Run getscu/movescu once per item; the number of failed sub-operations it reported.

    The files it wrote go through ``receiver`` (checks and naming) as the tool exits; a
    ``TargetError`` when it failed or the peer's final status was not success or warning.
    """
    tool_name = "getscu" if method == "get" else "movescu"
    tool = dcmtk_tool(tool_name)
    if tool is None:
        raise PermanentTargetError(
            f"DCMTK {tool_name} not found (install the Debian package 'dcmtk' or use the "
            "pynetdicom backend)"
        )
    service = "C-GET" if method == "get" else "C-MOVE"
    staging.mkdir(parents=True, exist_ok=True)
    failed_total = 0
    finished = threading.Event()

    def count_arrivals() -> None:  # progress while the tool runs: files in its folder
        while not finished.wait(0.5):
            if receiver.progress is not None:
                with contextlib.suppress(OSError), os.scandir(staging) as entries:
                    arrived = sum(1 for _ in entries)
                    receiver.progress(len(receiver.instances) + arrived, receiver.expected)

    watcher = threading.Thread(target=count_arrivals, name="dcmtk-progress", daemon=True)
    watcher.start()
    try:
        for item in items:
            args = _dcmtk_args(tool, peer, item, staging, method, move_aet, listen)
            timeout = peer.connect_timeout + peer.acse_timeout + 3600
            if receiver.progress is not None:
                receiver.progress(len(receiver.instances), receiver.expected)
            code, output = _run_tool(args, staging, timeout)
            _take(staging, receiver)
            if code != 0:
                errors = [line for line in output.splitlines() if line.startswith(("E:", "F:"))]
                reason = (errors or output.splitlines() or [f"exit code {code}"])[-1]
                kind = (
                    TransientTargetError
                    if any(w in output for w in ("Connection refused", "Timeout", "TCP"))
                    else PermanentTargetError
                )
                raise kind(f"{tool_name} {peer.describe()}: {reason}")
            final, failed = _dcmtk_outcome(output)
            if final is not None and not final.startswith(("Success", "Warning")):
                raise PermanentTargetError(f"{service} at {peer.describe()} answered {final}")
            failed_total += failed
    finally:
        finished.set()
        watcher.join(timeout=2)
        with contextlib.suppress(OSError):
            shutil.rmtree(staging)
    return failed_total
