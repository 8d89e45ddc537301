"""``dicom-dispatch jobs``: list, run, remove, terminate and wait for background jobs.

::

    jobs list [--type T] [--json] [--recent-hours H]   queued (with positions), active, recent
    jobs run MODULE:FUNC --type T [--num-proc N] [--limit TYPE=N]... [--priority P] [--wait]
             [ARG...]                                  ARGs are JSON values, else strings
    jobs remove ID                                     a queued job never starts
    jobs terminate ID [--timeout S]                    kill a running job ("Forcefully aborted")
    jobs wait ID [--timeout S] [--json]                exit 0 iff the job succeeded

Exit codes: 0 success, 1 the job failed / is not queued / not found, 2 usage error (a refused
function, arguments, type or limit).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from flows.background import BackgroundTask

__all__ = ["add_jobs_parser", "main"]


def _err(message: str) -> None:
    print(f"dicom-dispatch: {message}", file=sys.stderr)


def _first_line(text: str | None, width: int = 60) -> str:
    if not text:
        return ""
    lines = [line for line in text.strip().splitlines() if line.strip()]
    line = lines[-1] if text.startswith("Traceback") and lines else (lines[0] if lines else "")
    return line if len(line) <= width else line[: width - 1] + "…"


def _when(task: BackgroundTask, attr: str) -> str:
    value = getattr(task, attr)
    return value.astimezone().strftime("%Y-%m-%d %H:%M:%S") if value else ""


def _table(rows: Sequence[Sequence[Any]], header: Sequence[str]) -> None:
    cells = [list(map(str, header)), *[[str(c) for c in r] for r in rows]]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    for row in cells:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())


def _parse_arg(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        return text


def _parse_limits(items: Sequence[str]) -> dict[str, int]:
    limits: dict[str, int] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key or not value.strip().isdigit():
            raise ValueError(f"--limit {item!r} is not TYPE=N")
        limits[key] = int(value)
    return limits


async def cmd_jobs_list(args: argparse.Namespace, home: Path) -> int:
    from flows.background import list_tasks

    listing = await asyncio.to_thread(list_tasks, args.type, args.recent_hours)
    if args.json:
        data = {
            "queued": [
                {**task.as_dict(), "queue_position": q.queue_position} for q, task in listing.queued
            ],
            "active": [t.as_dict() for t in listing.active],
            "recent": [t.as_dict() for t in listing.recent],
        }
        print(json.dumps(data, indent=2, default=str))
        return 0
    print(f"queued ({len(listing.queued)})")
    _table(
        [(q.queue_position, t.uuid, t.task_type, t.priority, t.func) for q, t in listing.queued],
        ("POS", "ID", "TYPE", "PRIORITY", "FUNC"),
    )
    print(f"\nactive ({len(listing.active)})")
    _table(
        [
            (t.uuid, t.task_type, t.state, _when(t, "started_at"), t.proc_id or "", t.info or "")
            for t in listing.active
        ],
        ("ID", "TYPE", "STATE", "STARTED", "PROCESS", "INFO"),
    )
    print(f"\nrecent ({len(listing.recent)})")
    _table(
        [
            (t.uuid, t.task_type, t.state, _when(t, "ended_at"), _first_line(t.error))
            for t in listing.recent
        ],
        ("ID", "TYPE", "STATE", "ENDED", "ERROR"),
    )
    return 0


def _print_task(task: BackgroundTask, as_json: bool) -> None:
    if as_json:
        print(json.dumps(task.as_dict(), indent=2, default=str))
        return
    print(f"{task.uuid}  {task.task_type}  {task.state}")
    if task.info:
        print(f"  info:  {task.info}")
    if task.error:
        print("  error: " + task.error.rstrip().replace("\n", "\n         "))


async def cmd_jobs_run(args: argparse.Namespace, home: Path) -> int:
    from flows.background import JobRefusedError, run_in_background_with_limits, wait_task

    try:
        limits = _parse_limits(args.limit)
        task = await asyncio.to_thread(
            run_in_background_with_limits,
            args.func,
            args.type,
            args.num_proc,
            limits,
            *[_parse_arg(a) for a in args.args],
            priority=args.priority,
        )
    except (JobRefusedError, ValueError) as exc:
        _err(str(exc))
        return 2
    if not args.wait:
        print(task.uuid)
        return 0
    done = await asyncio.to_thread(wait_task, task)
    _print_task(done, args.json)
    return 0 if done.completed_successfully else 1


async def cmd_jobs_remove(args: argparse.Namespace, home: Path) -> int:
    from flows.background import BackgroundJobError, remove_task_from_queue

    try:
        task = await asyncio.to_thread(remove_task_from_queue, args.id)
    except BackgroundJobError as exc:
        _err(str(exc))
        return 1
    print(f"{task.uuid}: removed from the queue")
    return 0


async def cmd_jobs_terminate(args: argparse.Namespace, home: Path) -> int:
    from flows.background import BackgroundJobError, terminate_background

    try:
        task = await asyncio.to_thread(terminate_background, args.id, args.timeout)
    except BackgroundJobError as exc:
        _err(str(exc))
        return 1
    _print_task(task, False)
    return 0 if task.complete else 1


async def cmd_jobs_wait(args: argparse.Namespace, home: Path) -> int:
    from flows.background import BackgroundJobError, wait_task

    try:
        task = await asyncio.to_thread(wait_task, args.id, args.timeout)
    except (BackgroundJobError, TimeoutError) as exc:
        _err(str(exc))
        return 1
    _print_task(task, args.json)
    return 0 if task.completed_successfully else 1


class _IntermixedParser(argparse.ArgumentParser):
    """Options may come after positionals (``run MODULE:FUNC --type T ARG...``)."""

    _inside = False

    def parse_known_args(  # type: ignore[override]
        self, args: Sequence[str] | None = None, namespace: argparse.Namespace | None = None
    ) -> tuple[argparse.Namespace, list[str]]:
        if self._inside:
            return super().parse_known_args(args, namespace)
        self._inside = True
        try:
            return self.parse_known_intermixed_args(args, namespace)
        finally:
            self._inside = False


def add_jobs_parser(subparsers: Any) -> None:
    """Add ``jobs`` and its actions to the ``dicom-dispatch`` sub-command parsers."""
    jobs = subparsers.add_parser("jobs", help="background jobs: list, run, remove, terminate, wait")
    sub = jobs.add_subparsers(
        dest="jobs_command", required=True, metavar="ACTION", parser_class=_IntermixedParser
    )

    p = sub.add_parser("list", help="queued (with positions), active and recent jobs")
    p.add_argument("--type", default=None, help="only this task type (exact match)")
    p.add_argument("--recent-hours", type=float, default=6.0, help="ended jobs this recent")
    p.add_argument("--json", action="store_true")
    p.set_defaults(handler=cmd_jobs_list)

    p = sub.add_parser("run", help="queue MODULE:FUNC(ARG...) as a background job")
    p.add_argument("func", metavar="MODULE:FUNC")
    p.add_argument("--type", required=True, help="the job's task type")
    p.add_argument("--num-proc", type=int, default=0, help="start only while fewer jobs run")
    p.add_argument(
        "--limit",
        action="append",
        default=[],
        metavar="TYPE=N",
        help="start only while fewer than N jobs of TYPE run (repeatable)",
    )
    p.add_argument("--priority", type=int, default=0, help="higher starts first (default 0)")
    p.add_argument("--wait", action="store_true", help="wait; exit 0 iff the job succeeded")
    p.add_argument("--json", action="store_true", help="with --wait: the record as JSON")
    p.add_argument("args", nargs="*", metavar="ARG", help="a JSON value, else a string")
    p.set_defaults(handler=cmd_jobs_run)

    p = sub.add_parser("remove", help="remove a queued job (it never starts)")
    p.add_argument("id", metavar="ID")
    p.set_defaults(handler=cmd_jobs_remove)

    p = sub.add_parser("terminate", help="stop a job by force")
    p.add_argument("id", metavar="ID")
    p.add_argument("--timeout", type=float, default=30.0, help="seconds to wait for the end")
    p.set_defaults(handler=cmd_jobs_terminate)

    p = sub.add_parser("wait", help="wait for a job; exit 0 iff it succeeded")
    p.add_argument("id", metavar="ID")
    p.add_argument("--timeout", type=float, default=None)
    p.add_argument("--json", action="store_true")
    p.set_defaults(handler=cmd_jobs_wait)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m deployments.jobs_cli ACTION ...`` (the same as ``dicom-dispatch jobs``)."""
    from deployments.environment import choose_api, prepare_environment

    parser = argparse.ArgumentParser(prog="dicom-dispatch")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    add_jobs_parser(sub)
    args = parser.parse_args(["jobs", *(sys.argv[1:] if argv is None else argv)])
    home = prepare_environment()
    choose_api(home)
    handler: Callable[[argparse.Namespace, Path], Any] = args.handler
    try:
        return int(asyncio.run(handler(args, home)))
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
