"""The query/retrieve commands of ``dicom-dispatch`` (architecture §4.5)::

    query TARGET --accession A [--filter KEY=VALUE]... [--level study|series] [--json]
    retrieve TARGET --accession A (--dest DIR | --to-outgoing --targets T[,T...]) [--filter ...]
    retrieve-batch TARGET --accessions-file F (--dest DIR | --to-outgoing --targets T[,T...])
                   [--filter ...] [--offpeak] [--wait] [--json]
    batch pause|resume|retry|status RUN_ID [--json]

``query`` and ``retrieve`` run in this process (no runner needed). ``retrieve-batch`` runs the
check step here and starts one run of the ``retrieve`` deployment per accession, so a service
(``dicom-dispatch serve``) must be serving the deployments; it prints the batch id and returns
(``--wait`` follows it to the end). Usage errors exit 2, failures 1, with one line on stderr.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

__all__ = ["add_query_parsers"]

STUDY_COLUMNS = (
    "AccessionNumber",
    "PatientID",
    "StudyDate",
    "StudyDescription",
    "ModalitiesInStudy",
    "NumberOfStudyRelatedInstances",
    "StudyInstanceUID",
)
SERIES_COLUMNS = (
    "AccessionNumber",
    "PatientID",
    "SeriesNumber",
    "Modality",
    "SeriesDescription",
    "NumberOfSeriesRelatedInstances",
    "SeriesInstanceUID",
)
WAIT_POLL_SECONDS = 2.0


def _usage(message: str) -> int:
    print(f"dicom-dispatch: {message}", file=sys.stderr)
    return 2


def _fail(message: str) -> int:
    print(f"dicom-dispatch: {message}", file=sys.stderr)
    return 1


def _print_json(data: Any) -> None:
    print(json.dumps(data, indent=2, default=str))


def _table(rows: Sequence[dict[str, Any]], columns: Sequence[str]) -> None:
    cells = [list(columns)] + [
        ["" if r.get(c) is None else str(r.get(c)) for c in columns] for r in rows
    ]
    widths = [max(len(row[i]) for row in cells) for i in range(len(columns))]
    for row in cells:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())


def filter_arg(text: str) -> tuple[str, str]:
    """``KEY=VALUE`` with a DICOM keyword (checked here, so a typo is a usage error)."""
    from blocks.qr import QueryError, normalize_filters

    key, sep, value = text.partition("=")
    if not sep or not key.strip() or not value.strip():
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    try:
        normalize_filters({key.strip(): value})
    except QueryError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return key.strip(), value.strip()


def _filters(pairs: Sequence[tuple[str, str]] | None) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for key, value in pairs or []:
        out.setdefault(key, []).append(value)
    return out


def _destination(args: argparse.Namespace) -> tuple[str, list[str]] | str:
    """(destination, targets), or a usage error message."""
    from flows.query import OUTGOING, parse_accessions

    targets = parse_accessions(args.targets) if args.targets else []
    if args.to_outgoing:
        if not targets:
            return "--to-outgoing needs --targets T[,T...]"
        return OUTGOING, targets
    if targets:
        return "--targets only goes with --to-outgoing"
    return str(Path(args.dest).expanduser().resolve()), []


# --------------------------------------------------------------------------- handlers


async def cmd_query(args: argparse.Namespace, home: Path) -> int:
    from flows.query import query

    rows = await query(args.target, args.accession, _filters(args.filter), args.level)
    if args.json:
        _print_json(rows)
    elif rows:
        _table(rows, STUDY_COLUMNS if args.level == "study" else SERIES_COLUMNS)
    if not rows:
        return _fail(f"nothing found for accession {args.accession} on {args.target}")
    return 0


def _progress_bar() -> Any:
    width = 30

    def show(received: int, expected: int | None) -> None:
        if expected:
            done = min(width, width * received // expected)
            bar = "#" * done + "-" * (width - done)
            sys.stderr.write(f"\r[{bar}] {received}/{expected}")
        else:
            sys.stderr.write(f"\r{received} received")
        sys.stderr.flush()

    return show


async def cmd_retrieve(args: argparse.Namespace, home: Path) -> int:
    from flows.query import PROGRESS_LISTENERS, retrieve

    where = _destination(args)
    if isinstance(where, str):
        return _usage(where)
    destination, targets = where
    bar = _progress_bar() if sys.stderr.isatty() and not args.json else None
    if bar is not None:
        PROGRESS_LISTENERS.append(bar)
    try:
        result = await retrieve(
            args.target, args.accession, _filters(args.filter), destination, targets or None
        )
    finally:
        if bar is not None:
            PROGRESS_LISTENERS.remove(bar)
            sys.stderr.write("\n")
    if args.json:
        _print_json(result)
    else:
        print(
            f"{result['accession']}: {result['instances']} instance(s) -> {result['destination']}"
        )
    return 0


def _read_accessions(path: str) -> list[str] | str:
    from flows.query import parse_accessions

    try:
        text = sys.stdin.read() if path == "-" else Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        return f"cannot read {path}: {exc.strerror}"
    numbers = parse_accessions(text)
    return numbers or f"no accession numbers in {path}"


async def cmd_retrieve_batch(args: argparse.Namespace, home: Path) -> int:
    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectNotFound

    from flows.query import RETRIEVE_DEPLOYMENT, retrieve_batch

    where = _destination(args)
    if isinstance(where, str):
        return _usage(where)
    numbers = _read_accessions(args.accessions_file)
    if isinstance(numbers, str):
        return _usage(numbers)
    destination, targets = where
    async with get_client() as client:
        try:
            await client.read_deployment_by_name(RETRIEVE_DEPLOYMENT)
        except ObjectNotFound:
            return _fail(
                "no 'retrieve' deployment is served: start 'dicom-dispatch serve' first "
                "(it runs the retrievals)"
            )
    result = await retrieve_batch(
        args.target, numbers, _filters(args.filter), destination, targets or None, args.offpeak
    )
    if not args.wait:
        if args.json:
            _print_json(result)
        else:
            print(
                f"batch {result['batch_id']}: {result['total']} retrieval(s) scheduled for "
                f"{result['scheduled_for']}"
            )
        return 0
    return await _follow(result["batch_id"], args.json)


async def _follow(batch_id: str, as_json: bool) -> int:
    from flows.query import batch_status

    last = ""
    while True:
        status = await batch_status(batch_id)
        line = f"batch {batch_id}: {status.state}, {status.completed}/{status.total} retrieved"
        if line != last and not as_json:
            print(line, flush=True)
            last = line
        if status.state in ("Completed", "Failed"):
            if as_json:
                _print_json(status.as_dict())
            return 0 if status.state == "Completed" else 1
        await asyncio.sleep(WAIT_POLL_SECONDS)


async def cmd_batch(args: argparse.Namespace, home: Path) -> int:
    from flows.query import batch_status, pause_batch, resume_batch, retry_batch

    action = args.batch_command
    if action == "status":
        status = await batch_status(args.run_id)
        if args.json:
            _print_json(status.as_dict())
        else:
            counts = ", ".join(f"{n} {s.lower()}" for s, n in sorted(status.counts.items()))
            print(f"batch {status.batch_id}: {status.state} ({counts or 'no runs'})")
            if status.message:
                print(f"  {status.message}")
            _table(status.children, ("accession", "state", "scheduled", "flow_run"))
        return 0
    operation = {"pause": pause_batch, "resume": resume_batch, "retry": retry_batch}[action]
    count = await operation(args.run_id)
    verb = {"pause": "paused", "resume": "resumed", "retry": "retried"}[action]
    if args.json:
        _print_json({"batch_id": args.run_id, verb: count})
    else:
        print(f"batch {args.run_id}: {count} retrieval(s) {verb}")
    return 0


# --------------------------------------------------------------------------- parsers


def _add_source(p: argparse.ArgumentParser) -> None:
    p.add_argument("target", metavar="TARGET", help="the DICOM or DICOMweb node (pull/both)")
    p.add_argument(
        "--filter",
        action="append",
        type=filter_arg,
        metavar="KEY=VALUE",
        help="DICOM keyword filter; repeat a KEY for several values",
    )


def _add_destination(p: argparse.ArgumentParser) -> None:
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--dest", metavar="DIR", help="folder: DIR/<run id>/<accession>/")
    where.add_argument(
        "--to-outgoing", action="store_true", help="a new case in the outgoing queue"
    )
    p.add_argument("--targets", metavar="T[,T...]", help="targets of the new case(s)")
    p.add_argument("--json", action="store_true")


def add_query_parsers(subparsers: Any) -> None:
    """Add ``query``, ``retrieve``, ``retrieve-batch`` and ``batch`` to ``dicom-dispatch``."""
    p = subparsers.add_parser("query", help="find studies/series by accession number")
    _add_source(p)
    p.add_argument("--accession", required=True, metavar="A")
    p.add_argument("--level", choices=("study", "series"), default="series")
    p.add_argument("--json", action="store_true")
    p.set_defaults(handler=cmd_query)

    p = subparsers.add_parser("retrieve", help="fetch one accession into a folder or outgoing/")
    _add_source(p)
    p.add_argument("--accession", required=True, metavar="A")
    _add_destination(p)
    p.set_defaults(handler=cmd_retrieve)

    p = subparsers.add_parser(
        "retrieve-batch", help="fetch a list of accessions as one batch of retrieve runs"
    )
    _add_source(p)
    p.add_argument(
        "--accessions-file",
        required=True,
        metavar="F",
        help="accession numbers, one per line or comma-separated ('-': stdin)",
    )
    _add_destination(p)
    p.add_argument("--offpeak", action="store_true", help="run in the off-peak window")
    p.add_argument("--wait", action="store_true", help="follow the batch to its end")
    p.set_defaults(handler=cmd_retrieve_batch)

    batch = subparsers.add_parser("batch", help="pause, resume, retry or show a retrieve batch")
    bsub = batch.add_subparsers(dest="batch_command", required=True, metavar="ACTION")
    for action, text in (
        ("pause", "queued retrievals don't start (running ones finish)"),
        ("resume", "paused retrievals are scheduled again"),
        ("retry", "failed or cancelled retrievals run again"),
        ("status", "state of the batch and of each retrieval"),
    ):
        p = bsub.add_parser(action, help=text)
        p.add_argument("run_id", metavar="RUN_ID", help="the batch's flow run id")
        p.add_argument("--json", action="store_true")
        p.set_defaults(handler=cmd_batch)
