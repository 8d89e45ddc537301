"""``dicom-dispatch jobs``: list, run, remove, terminate and wait for background jobs.

::

    jobs list [--type T] [--json] [--recent-hours H]   queued (with positions), active, recent
    jobs run MODULE:FUNC --type T [--num-proc N] [--limit TYPE=N]... [--priority P] [--wait]
             [ARG...]                                  ARGs are JSON values, else strings
    jobs remove ID                                     a queued job never starts
    jobs terminate ID [--timeout S]                    kill a running job ("Forcefully aborted")
    jobs wait ID [--timeout S] [--json]                exit 0 iff the job succeeded

Exit codes: 0 success, 1 the job failed / is not queued / not found, 2 usage error (a refused
function, arguments, type or limit: ``JobRefusedError``). The job API is synchronous, so every
call runs in a worker thread.
"""

from __future__ import annotations

import argparse
import asyncio
import json
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from deployments.cli.core import UsageError, add_command, print_json, short, table

if TYPE_CHECKING:
    from flows.background import BackgroundTask

__all__ = ["add_jobs_parser"]

#: Width of the ERROR column of ``jobs list`` (the whole error is in ``--json``).
ERROR_WIDTH = 60


def _when(task: BackgroundTask, attr: str) -> str:
    value = getattr(task, attr)
    return value.astimezone().strftime("%Y-%m-%d %H:%M:%S") if value else ""


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
            raise UsageError(f"--limit {item!r} is not TYPE=N")
        limits[key] = int(value)
    return limits


async def cmd_jobs_list(args: argparse.Namespace, home: Path) -> int:
    from flows.background import list_tasks

    listing = await asyncio.to_thread(list_tasks, args.type, args.recent_hours)
    if args.json:
        print_json(
            {
                "queued": [
                    {**task.as_dict(), "queue_position": q.queue_position}
                    for q, task in listing.queued
                ],
                "active": [t.as_dict() for t in listing.active],
                "recent": [t.as_dict() for t in listing.recent],
            }
        )
        return 0
    table(
        [(q.queue_position, t.uuid, t.task_type, t.priority, t.func) for q, t in listing.queued],
        ("POS", "ID", "TYPE", "PRIORITY", "FUNC"),
        title=f"queued ({len(listing.queued)})",
    )
    print()
    table(
        [
            (t.uuid, t.task_type, t.state, _when(t, "started_at"), t.proc_id, t.info)
            for t in listing.active
        ],
        ("ID", "TYPE", "STATE", "STARTED", "PROCESS", "INFO"),
        title=f"active ({len(listing.active)})",
    )
    print()
    table(
        [
            (t.uuid, t.task_type, t.state, _when(t, "ended_at"), short(t.error, ERROR_WIDTH))
            for t in listing.recent
        ],
        ("ID", "TYPE", "STATE", "ENDED", "ERROR"),
        title=f"recent ({len(listing.recent)})",
    )
    return 0


def _print_task(task: BackgroundTask, as_json: bool, note: str | None = None) -> None:
    """The job's record; ``note`` replaces the detail lines of the human form."""
    if as_json:
        print_json(task.as_dict())
        return
    if note is not None:
        print(f"{task.uuid}: {note}")
        return
    print(f"{task.uuid}  {task.task_type}  {task.state}")
    if task.info:
        print(f"  info:  {task.info}")
    if task.error:
        print("  error: " + task.error.rstrip().replace("\n", "\n         "))


async def cmd_jobs_run(args: argparse.Namespace, home: Path) -> int:
    from flows.background import run_in_background_with_limits, wait_task

    task = await asyncio.to_thread(
        run_in_background_with_limits,
        args.func,
        args.type,
        args.num_proc,
        _parse_limits(args.limit),
        *[_parse_arg(a) for a in args.args],
        priority=args.priority,
    )
    if not args.wait:
        if args.json:
            print_json(task.as_dict())
        else:
            print(task.uuid)
        return 0
    done = await asyncio.to_thread(wait_task, task)
    _print_task(done, args.json)
    return 0 if done.completed_successfully else 1


async def cmd_jobs_remove(args: argparse.Namespace, home: Path) -> int:
    from flows.background import remove_task_from_queue

    task = await asyncio.to_thread(remove_task_from_queue, args.id)
    _print_task(task, args.json, note="removed from the queue")
    return 0


async def cmd_jobs_terminate(args: argparse.Namespace, home: Path) -> int:
    from flows.background import terminate_background

    task = await asyncio.to_thread(terminate_background, args.id, args.timeout)
    _print_task(task, args.json)
    return 0 if task.complete else 1


async def cmd_jobs_wait(args: argparse.Namespace, home: Path) -> int:
    from flows.background import wait_task

    task = await asyncio.to_thread(wait_task, args.id, args.timeout)
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


def add_jobs_parser(sub: Any) -> None:
    """``jobs`` and its actions."""
    jobs = sub.add_parser("jobs", help="background jobs: list, run, remove, terminate, wait")
    jsub = jobs.add_subparsers(
        dest="jobs_command", required=True, metavar="ACTION", parser_class=_IntermixedParser
    )

    p = add_command(jsub, "list", cmd_jobs_list, "queued (with positions), active and recent jobs")
    p.add_argument("--type", default=None, help="only this task type (exact match)")
    p.add_argument("--recent-hours", type=float, default=6.0, help="ended jobs this recent")

    p = add_command(jsub, "run", cmd_jobs_run, "queue MODULE:FUNC(ARG...) as a background job")
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
    p.add_argument("args", nargs="*", metavar="ARG", help="a JSON value, else a string")

    p = add_command(jsub, "remove", cmd_jobs_remove, "remove a queued job (it never starts)")
    p.add_argument("id", metavar="ID")

    p = add_command(jsub, "terminate", cmd_jobs_terminate, "stop a job by force")
    p.add_argument("id", metavar="ID")
    p.add_argument("--timeout", type=float, default=30.0, help="seconds to wait for the end")

    p = add_command(jsub, "wait", cmd_jobs_wait, "wait for a job; exit 0 iff it succeeded")
    p.add_argument("id", metavar="ID")
    p.add_argument("--timeout", type=float, default=None)
