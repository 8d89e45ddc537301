"""mercure's side of each comparison: its exact ``dcmsend`` command, one case or a loop of them,
and the DCMTK ``storescp`` peers both sides send to."""

from __future__ import annotations

import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from bench._common import timed_tool
from bench.dispatch.config import HOST, SCP_AET


def dcmsend_binary() -> str:
    from blocks._dcmsend import find_dcmsend

    binary = find_dcmsend()
    if binary is None:
        sys.exit("DCMTK dcmsend not found (install the Debian package 'dcmtk')")
    return binary


def mercure_dcmsend(binary: str, case: Path, port: int, report: Path) -> list[str]:
    """mercure's exact command line (reference §3.1): no -aet, -to 60, report in the case."""
    return [binary, HOST, str(port), "+r", "+sd", str(case), "-aec", SCP_AET, "-nuc"] + [
        "+sp",
        "*.dcm",
        "-to",
        "60",
        "+crf",
        str(report),
    ]


def run_dcmsend(binary: str, case: Path, port: int, report: Path) -> float:
    return timed_tool(mercure_dcmsend(binary, case, port, report))


def dcmsend_loop(binary: str, cases: list[Path], port: int) -> float:
    """mercure's model: one dcmsend per case, one after the other, report parsed after each."""
    from blocks._dcmsend_report import parse_report

    started = time.perf_counter()
    for case in cases:
        report = case / "sent.txt"
        run_dcmsend(binary, case, port, report)
        summary = parse_report(report.read_text())["summary"]
        if summary.get("sop_instances") != summary.get("successful"):
            raise RuntimeError(f"dcmsend loop: {case.name} not fully sent")
    return time.perf_counter() - started


@contextmanager
def storescp(folder: Path, fork: bool) -> Iterator[Any]:
    from tests.peers.dcmtk import StoreSCP

    with StoreSCP(folder, aet=SCP_AET, nodelay=True, fork=fork) as scp:
        yield scp
