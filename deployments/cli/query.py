"""The query/retrieve commands::

    query TARGET --accession A [--filter KEY=VALUE]... [--level study|series] [--json]
    retrieve TARGET --accession A (--dest DIR | --to-outgoing --targets T[,T...]) [--filter ...]
    retrieve-batch TARGET --accessions-file F (--dest DIR | --to-outgoing --targets T[,T...])
                   [--filter ...] [--offpeak] [--wait] [--json]
    batch pause|resume|retry|status RUN_ID [--json]

``query`` and ``retrieve`` run in this process (no runner needed). ``retrieve-batch`` runs the
check step here and starts one run of the ``retrieve`` deployment per accession, so a service
(``dicom-dispatch serve``) must be serving the deployments; it prints the batch id and returns
(``--wait`` follows it to the end).
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from deployments.cli.core import (
    CommandFailed,
    ProgressBar,
    UsageError,
    add_command,
    listening,
    print_json,
    table,
)

__all__ = ["add_query_parsers", "filter_arg"]

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
BATCH_COLUMNS = ("accession", "state", "scheduled", "flow_run")
WAIT_POLL_SECONDS = 2.0


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


def _destination(args: argparse.Namespace) -> tuple[str, list[str] | None]:
    """(destination, targets of the new cases or ``None``) from --dest / --to-outgoing."""
    from flows.query import OUTGOING, parse_accessions

    targets = parse_accessions(args.targets) if args.targets else []
    if args.to_outgoing:
        if not targets:
            raise UsageError("--to-outgoing needs --targets T[,T...]")
        return OUTGOING, targets
    if targets:
        raise UsageError("--targets only goes with --to-outgoing")
    return str(Path(args.dest).expanduser().resolve()), None


def _rows(rows: Sequence[dict[str, Any]], columns: Sequence[str]) -> list[list[Any]]:
    return [[r.get(c) for c in columns] for r in rows]


async def cmd_query(args: argparse.Namespace, home: Path) -> int:
    from flows.query import query

    rows = await query(args.target, args.accession, _filters(args.filter), args.level)
    if args.json:
        print_json(rows)
    elif rows:
        columns = STUDY_COLUMNS if args.level == "study" else SERIES_COLUMNS
        table(_rows(rows, columns), columns)
    if not rows:
        raise CommandFailed(f"nothing found for accession {args.accession} on {args.target}")
    return 0


async def cmd_retrieve(args: argparse.Namespace, home: Path) -> int:
    from flows.query import PROGRESS_LISTENERS, retrieve

    destination, targets = _destination(args)
    with ProgressBar(args.json) as bar, listening(PROGRESS_LISTENERS, bar, args.accession):
        result = await retrieve(
            args.target, args.accession, _filters(args.filter), destination, targets
        )
    if args.json:
        print_json(result)
    else:
        print(
            f"{result['accession']}: {result['instances']} instance(s) -> {result['destination']}"
        )
    return 0


def _read_accessions(path: str) -> list[str]:
    from flows.query import parse_accessions

    try:
        text = sys.stdin.read() if path == "-" else Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise UsageError(f"cannot read {path}: {exc.strerror}") from None
    numbers = parse_accessions(text)
    if not numbers:
        raise UsageError(f"no accession numbers in {path}")
    return numbers


async def _require_retrieve_deployment() -> None:
    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectNotFound

    from flows.query import RETRIEVE_DEPLOYMENT

    async with get_client() as client:
        try:
            await client.read_deployment_by_name(RETRIEVE_DEPLOYMENT)
        except ObjectNotFound:
            raise CommandFailed(
                "no 'retrieve' deployment is served: start 'dicom-dispatch serve' first "
                "(it runs the retrievals)"
            ) from None


async def cmd_retrieve_batch(args: argparse.Namespace, home: Path) -> int:
    from flows.query import retrieve_batch

    destination, targets = _destination(args)
    numbers = _read_accessions(args.accessions_file)
    await _require_retrieve_deployment()
    result = await retrieve_batch(
        args.target, numbers, _filters(args.filter), destination, targets, args.offpeak
    )
    if args.wait:
        return await _follow(result["batch_id"], args.json)
    if args.json:
        print_json(result)
    else:
        print(
            f"batch {result['batch_id']}: {result['total']} retrieval(s) scheduled for "
            f"{result['scheduled_for']}"
        )
    return 0


async def _follow(batch_id: str, as_json: bool) -> int:
    """Poll the batch to its end: a line per change (stdout), a bar (stderr, on a terminal)."""
    from flows.query import batch_status

    last = ""
    with ProgressBar(as_json) as bar:
        progress = bar.add(f"batch {batch_id[:8]}")
        while True:
            status = await batch_status(batch_id)
            bar.update(progress, status.completed, status.total)
            line = f"batch {batch_id}: {status.state}, {status.completed}/{status.total} retrieved"
            if line != last and not as_json:
                print(line, flush=True)
                last = line
            if status.state in ("Completed", "Failed"):
                break
            await asyncio.sleep(WAIT_POLL_SECONDS)
    if as_json:
        print_json(status.as_dict())
    return 0 if status.state == "Completed" else 1


async def cmd_batch(args: argparse.Namespace, home: Path) -> int:
    from flows.query import batch_status, pause_batch, resume_batch, retry_batch

    action = args.batch_command
    if action == "status":
        status = await batch_status(args.run_id)
        if args.json:
            print_json(status.as_dict())
            return 0
        counts = ", ".join(f"{n} {s.lower()}" for s, n in sorted(status.counts.items()))
        print(f"batch {status.batch_id}: {status.state} ({counts or 'no runs'})")
        if status.message:
            print(f"  {status.message}")
        table(_rows(status.children, BATCH_COLUMNS), BATCH_COLUMNS)
        return 0
    operation = {"pause": pause_batch, "resume": resume_batch, "retry": retry_batch}[action]
    count = await operation(args.run_id)
    verb = {"pause": "paused", "resume": "resumed", "retry": "retried"}[action]
    if args.json:
        print_json({"batch_id": args.run_id, verb: count})
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


def add_query_parsers(sub: Any) -> None:
    """``query``, ``retrieve``, ``retrieve-batch`` and ``batch``."""
    p = add_command(sub, "query", cmd_query, "find studies/series by accession number")
    _add_source(p)
    p.add_argument("--accession", required=True, metavar="A")
    p.add_argument("--level", choices=("study", "series"), default="series")

    p = add_command(sub, "retrieve", cmd_retrieve, "fetch one accession into a folder or outgoing/")
    _add_source(p)
    p.add_argument("--accession", required=True, metavar="A")
    _add_destination(p)

    p = add_command(
        sub,
        "retrieve-batch",
        cmd_retrieve_batch,
        "fetch a list of accessions as one batch of retrieve runs",
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

    batch = sub.add_parser("batch", help="pause, resume, retry or show a retrieve batch")
    bsub = batch.add_subparsers(dest="batch_command", required=True, metavar="ACTION")
    for action, text in (
        ("pause", "queued retrievals don't start (running ones finish)"),
        ("resume", "paused retrievals are scheduled again"),
        ("retry", "failed or cancelled retrievals run again"),
        ("status", "state of the batch and of each retrieval"),
    ):
        p = add_command(bsub, action, cmd_batch, text)
        p.add_argument("run_id", metavar="RUN_ID", help="the batch's flow run id")
