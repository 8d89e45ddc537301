"""Query and retrieve without a peer: multipart bodies cut whatever the chunking, the off-peak
window, accession lists, cores free of Prefect."""

from __future__ import annotations

import datetime as dt
import subprocess
import sys

from blocks._dicomweb_qr import iter_multipart


def test_multipart_parts_are_cut_whatever_the_chunking() -> None:
    parts = [b"\x00" * 1000 + b"DICM" + bytes(range(256)) * 40, b"second", b"--x\r\n"]
    body = b"preamble\r\n"
    for part in parts:
        body += b"--b0undary\r\nContent-Type: application/dicom\r\n\r\n" + part + b"\r\n"
    body += b"--b0undary--\r\n"
    for size in (1, 7, 64, 100000):
        chunks = [body[i : i + size] for i in range(0, len(body), size)]
        assert list(iter_multipart(chunks, b"b0undary")) == parts


def test_query_retrieve_cores_do_not_import_prefect() -> None:
    code = (
        "import sys, blocks.qr, blocks._dimse_qr, blocks._dicomweb_qr; "
        "sys.exit(1 if 'prefect' in sys.modules else 0)"
    )
    assert subprocess.run([sys.executable, "-c", code], timeout=60).returncode == 0


def test_offpeak_window_arithmetic() -> None:
    from flows.query import next_offpeak_start, parse_accessions

    at = dt.datetime(2026, 3, 1, 12, 30)
    assert next_offpeak_start("22:00", "06:00", at) == dt.datetime(2026, 3, 1, 22, 0)
    assert next_offpeak_start("22:00", "06:00", at.replace(hour=23)) is None
    assert next_offpeak_start("10:00", "11:00", at) == dt.datetime(2026, 3, 2, 10, 0)
    assert next_offpeak_start("12:00", "12:00", at) is None  # start == end: always
    assert parse_accessions(" A1, A2\nA3\r\n\nA1 ,") == ["A1", "A2", "A3"]
