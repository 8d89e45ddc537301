"""The dispatcher's commands: import-config, targets, dispatch, sweep, status, halt, unhalt, serve.

Prefect is imported only inside the handlers, after ``main`` chose the data directory and the
API, so building the parser (``--help``) stays instant.

Over 400 lines because each command is a short handler beside its parser lines; splitting the
eight commands further would scatter one verb's arguments from its handler.
"""

from __future__ import annotations

import argparse
import asyncio
import faulthandler
import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from blocks.errors import DispatchError
from deployments.cli.core import (
    CommandFailed,
    ProgressBar,
    UsageError,
    add_command,
    poll_while,
    print_json,
    report_failure,
    table,
)
from deployments.service.api import read_service_record
from deployments.service.supervisor import read_server_state
from tasks import casefolder as cf
from tasks.taskjson import TASKFILE, read_task, target_names

if TYPE_CHECKING:
    from blocks.base import DispatchTarget
    from blocks.settings import DispatcherSettings

__all__ = ["add_dispatch_parsers", "add_serve_parser"]

Look = Callable[[], tuple[int, int | None]]


async def cmd_import_config(args: argparse.Namespace, home: Path) -> int:
    from blocks.registry import aregister_block_types
    from deployments.importer import import_mercure_config

    await aregister_block_types()
    report = await import_mercure_config(Path(args.mercure_json))
    if args.json:
        print_json(report.as_dict())
        return 0
    for name, kind in report.imported.items():
        print(f"imported  {name} ({kind})")
    for name, why in report.skipped.items():
        print(f"skipped   {name}: {why}")
    for name, keys in report.ignored_fields.items():
        print(f"note      {name}: fields not used: {', '.join(keys)}")
    for names in report.notifications.values():
        for automation in names:
            print(f"automation {automation}")
    for name, warnings in report.warnings.items():
        for warning in warnings:
            print(f"warning   {name}: {warning}")
    print(f"cleaning  {report.cleaning['summary']}")
    print("settings  updated (DispatcherSettings 'default')")
    return 0


async def cmd_targets_list(args: argparse.Namespace, home: Path) -> int:
    from blocks.prefect_internals import block_name
    from blocks.registry import alist_targets

    header = ("name", "type", "block", "direction")
    rows = [
        (
            t.target_name or block_name(t),
            t.target_type,
            block_name(t),
            t.direction,
        )
        for t in await alist_targets()
    ]
    if args.json:
        print_json([dict(zip(header, r, strict=True)) for r in rows])
    else:
        table(rows, [h.upper() for h in header])
    return 0


async def cmd_targets_test(args: argparse.Namespace, home: Path) -> int:
    """The result is JSON with or without ``--json`` (it is a checklist of named checks)."""
    from blocks.registry import aload_target

    target = await aload_target(args.name)
    result = await asyncio.to_thread(target.test_connection)
    print_json({**result, **_backend_keys(target)})
    return 0 if target.connection_ok(result) else 1


def _case_progress(outgoing: Path, case: str) -> Look:
    """Targets sent of the case being dispatched, read from its task.json in outgoing/."""
    folder = outgoing / Path(case).name
    seen: list[int] = []

    def look() -> tuple[int, int | None]:
        try:
            _, task = read_task(folder)
        except (OSError, DispatchError):
            # Not there yet (a case in error/ is first moved back), or gone to success/error.
            return (seen[0], seen[0]) if seen else (0, None)
        names = target_names(task)
        status = task.dispatch.status if task.dispatch else {}
        seen[:] = [len(names)]
        return sum(1 for n in names if n in status and status[n].state == "complete"), len(names)

    return look


async def cmd_dispatch(args: argparse.Namespace, home: Path) -> int:
    from blocks.registry import aload_settings
    from flows.dispatch import run_dispatch

    with ProgressBar(args.json) as bar:
        look = (
            _case_progress((await aload_settings()).folders()[0], args.case)
            if bar.enabled
            else None
        )
        work = run_dispatch(args.case)
        result = await (
            poll_while(work, bar, f"case {Path(args.case).name}", look) if look else work
        )
    if "case_id" not in result:  # the run ended before it had an outcome (the API went away)
        raise CommandFailed(f"case {Path(args.case).name}: {result.get('reason') or 'no outcome'}")
    if args.json:
        print_json(result)
    else:
        print(f"{result['case_id']}: {result['location']} ({result['path']})")
        if result.get("reason"):
            print(f"  reason: {result['reason']}")
    return 0 if result["location"] == "success" else 1


def _attempted(case_dir: Path, since: float) -> bool:
    """The case left outgoing/, or its attempt ended there (claim gone, task.json rewritten)."""
    if not case_dir.is_dir():
        return True
    if (case_dir / cf.PROCESSING).exists():
        return False
    return (case_dir / TASKFILE).stat().st_mtime > since


def _sweep_progress(settings: DispatcherSettings) -> Look:
    """Cases of this pass whose attempt ended, of those ready when it started."""
    since = time.time()
    scan = cf.scan_outgoing(
        settings.folders()[0], rule_priorities=settings.rule_priorities, invalid_grace=1e18
    )
    ready = [c.path for c in scan.ready]
    return lambda: (sum(1 for p in ready if _attempted(p, since)), len(ready))


async def cmd_sweep(args: argparse.Namespace, home: Path) -> int:
    from blocks.registry import aload_settings
    from flows.sweep import sweep_outgoing

    ok = True
    total = 0
    with ProgressBar(args.json) as bar:
        while True:
            if bar.enabled:
                look = _sweep_progress(await aload_settings())
                result = await poll_while(sweep_outgoing(), bar, "sweep", look)
            else:
                result = await sweep_outgoing()
            total += result["dispatched"]
            ok = ok and result["dispatched"] == result["succeeded"]
            if not args.json:
                print(
                    f"dispatched {result['dispatched']}, succeeded {result['succeeded']}"
                    + (" (HALT)" if result["halted"] else "")
                )
            if not args.until_empty or result["halted"]:
                break
            if result["dispatched"]:
                continue
            if not result["waiting_for_retry"]:
                break
            wait = max(0.0, (result["next_retry_at"] or time.time()) - time.time())
            if not args.json:
                print(f"waiting {wait:.0f} s for the next retry")
            await asyncio.sleep(wait + 0.05)
    if args.json:
        print_json({"dispatched": total, "all_succeeded": ok})
    return 0 if ok else 1


def _count_cases(folder: Path) -> int:
    return sum(1 for p in folder.iterdir() if p.is_dir()) if folder.is_dir() else 0


def _backend_keys(target: DispatchTarget) -> dict[str, Any]:
    """``backend``/``retrieve_backend`` of a target that has a choice, ``auto`` resolved."""
    chosen = target.backends()
    return {"backend": chosen["send"], "retrieve_backend": chosen["retrieve"]} if chosen else {}


async def _target_backends() -> dict[str, str]:
    """Send backend per target that has a choice (DICOM), for ``status``."""
    from blocks.prefect_internals import block_name
    from blocks.registry import alist_targets

    return {
        str(t.target_name or block_name(t)): t.backends()["send"]
        for t in await alist_targets()
        if t.backends()
    }


async def cmd_status(args: argparse.Namespace, home: Path) -> int:
    from blocks.registry import aload_settings

    settings = await aload_settings()
    outgoing, success, error = settings.folders()
    scan = cf.scan_outgoing(outgoing, rule_priorities=settings.rule_priorities, invalid_grace=1e18)
    record = read_service_record(home)
    server = read_server_state(home) if record else None
    status: dict[str, Any] = {
        "halted": scan.halted,
        "outgoing": {
            "folder": str(outgoing),
            "ready": len(scan.ready),
            "waiting_for_retry": len(scan.not_due),
            "running": [p.name for p in scan.claimed],
            "locked": len(scan.busy),
            "invalid": len(scan.problems()),
        },
        "success": {"folder": str(success), "cases": _count_cases(success)},
        "error": {"folder": str(error), "cases": _count_cases(error)},
        "service": record or None,
        "server": server,
        "api_url": os.environ.get("PREFECT_API_URL") or "ephemeral",
        "backends": await _target_backends(),
    }
    if args.json:
        print_json(status)
        return 0
    print(f"dispatching: {'HALTED' if scan.halted else 'on'}")
    counts = (
        f"ready {len(scan.ready)}, waiting {len(scan.not_due)}, running {len(scan.claimed)}, "
        f"locked {len(scan.busy)}, invalid {len(scan.problems())}"
    )
    print(f"outgoing:    {outgoing}  {counts}")
    print(f"success:     {success}  {status['success']['cases']} case(s)")
    print(f"error:       {error}  {status['error']['cases']} case(s)")
    print(f"service:     {record['ui_url'] if record else 'not running'}")
    if server:
        print(f"server:      {server['state']}, {server['restarts']} restart(s) {server['detail']}")
        processes = server.get("processes") or {}
        if processes:
            shown = (
                f"{key} {' '.join(map(str, pids)) or 'down'}" for key, pids in processes.items()
            )
            print(f"processes:   {', '.join(shown)}")
    if status["backends"]:
        chosen = ", ".join(f"{name} {how}" for name, how in status["backends"].items())
        print(f"backends:    {chosen}")
    return 0


async def _set_halt(on: bool, as_json: bool) -> int:
    from blocks.registry import aload_settings

    outgoing = (await aload_settings()).folders()[0]
    outgoing.mkdir(parents=True, exist_ok=True)
    (cf.halt if on else cf.unhalt)(outgoing)
    if as_json:
        print_json({"halted": cf.is_halted(outgoing), "file": str(outgoing / cf.HALT)})
    else:
        print(f"dispatching {'halted' if on else 'resumed'} ({outgoing / cf.HALT})")
    return 0


async def cmd_halt(args: argparse.Namespace, home: Path) -> int:
    return await _set_halt(True, args.json)


async def cmd_unhalt(args: argparse.Namespace, home: Path) -> int:
    return await _set_halt(False, args.json)


def cmd_serve(args: argparse.Namespace, home: Path) -> int:
    """Run the service in a worker thread; the main thread only turns signals into a stop.

    Prefect's flow engine swaps its own SIGTERM handler in and out around every flow run it
    runs in the main thread; with many concurrent in-process case runs that would race with
    ours. Off the main thread the engine leaves signals alone.
    """
    from deployments.service.api import decide_api
    from deployments.service.api_auth import external_api_warning
    from deployments.service.dispatchers import default_workers
    from deployments.service.log import log_to_stderr
    from deployments.service.serve import is_loopback, serve
    from deployments.service.stop_budget import join_within_budget

    if not is_loopback(args.host) and not os.environ.get("PREFECT_SERVER_API_AUTH_STRING"):
        raise UsageError(
            f"refusing to serve on {args.host}: block secrets would be readable through the API; "
            "set PREFECT_SERVER_API_AUTH_STRING or bind to 127.0.0.1"
        )
    external = decide_api(home, "serve").url
    try:
        warning = external_api_warning(external) if external else None
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    if args.api_processes > 1 and external:
        raise UsageError(
            "--api-processes sets up the server serve starts; with PREFECT_API_URL set, "
            "serve uses that server (set its processes up there: see the README)"
        )
    if args.api_processes > 1 and args.db == "sqlite":
        raise UsageError("--api-processes needs PostgreSQL: several processes on SQLite stall")
    if warning:
        print(warning, file=sys.stderr, flush=True)
    log_to_stderr()  # the cleaner's removals, started processes: INFO lines in the journal
    stop = threading.Event()
    outcome: list[int] = []

    def service() -> None:
        workers = args.workers or default_workers(own_server=external is None)
        try:
            outcome.append(
                asyncio.run(
                    serve(home, args.host, args.port, args.db, stop, workers, args.api_processes)
                )
            )
        except Exception as exc:  # one line, as every command's error (deployments/cli/core.py)
            outcome.append(report_failure(exc))

    worker = threading.Thread(target=service, name="dicom-dispatch-service")
    # `kill -USR1` writes every thread's stack to stderr: what a hung service is doing.
    faulthandler.register(signal.SIGUSR1, all_threads=True)
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    worker.start()
    return join_within_budget(worker, stop, outcome)


def add_dispatch_parsers(sub: Any) -> None:
    """import-config, targets, dispatch, sweep, status, halt and unhalt."""
    p = add_command(
        sub, "import-config", cmd_import_config, "mercure.json targets/settings -> blocks"
    )
    p.add_argument("mercure_json", metavar="MERCURE_JSON")

    targets = sub.add_parser("targets", help="list or test targets")
    tsub = targets.add_subparsers(dest="targets_command", required=True, metavar="ACTION")
    add_command(tsub, "list", cmd_targets_list, "list the target blocks")
    p = add_command(tsub, "test", cmd_targets_test, "test a target's connection (exit 0 if usable)")
    p.add_argument("name", metavar="NAME")

    p = add_command(sub, "dispatch", cmd_dispatch, "one attempt for one case now")
    p.add_argument("case", metavar="CASE")

    p = add_command(sub, "sweep", cmd_sweep, "dispatch every ready case now and wait")
    p.add_argument(
        "--until-empty",
        action="store_true",
        help="repeat, waiting for retries, until nothing is ready or due",
    )

    add_command(sub, "status", cmd_status, "cases per folder, HALT, running cases, service URL")
    add_command(sub, "halt", cmd_halt, "create outgoing/HALT")
    add_command(sub, "unhalt", cmd_unhalt, "remove outgoing/HALT")


def cmd_install_service(args: argparse.Namespace, home: Path) -> int:
    from deployments.service_unit import NEXT_STEP, install_from_args

    try:
        path = install_from_args(args)
    except (ValueError, OSError) as exc:
        raise CommandFailed(str(exc)) from None
    if args.json:
        print_json({"unit": str(path), "next": NEXT_STEP})
    else:
        print(f"wrote {path}; now: {NEXT_STEP}")
    return 0


def add_install_service_parser(sub: Any) -> None:
    """``install-service`` writes a systemd unit; it needs no Prefect API."""
    from deployments.service_unit import add_arguments

    p = add_command(
        sub, "install-service", cmd_install_service, "write a systemd unit running serve as USER"
    )
    add_arguments(p)
    p.set_defaults(needs_api=False)


def add_serve_parser(sub: Any) -> None:
    """``serve`` picks its own API (it may start one), so ``main`` must not choose it first."""
    p = sub.add_parser("serve", help="run the service (Prefect server + UI, dispatcher loop)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=4200)
    p.add_argument(
        "--db",
        choices=("postgres", "sqlite"),
        default="postgres",
        help="database of the embedded Prefect server (default: postgres)",
    )
    p.add_argument(
        "--workers",
        type=_worker_count,
        default=None,
        metavar="N",
        help="dispatcher processes on this host (default: one per 2 CPUs it may use with the "
        "embedded server, one per CPU with an external one; at most 4)",
    )
    p.add_argument(
        "--api-processes",
        type=_api_process_count,
        default=1,
        metavar="N",
        help="API processes of the embedded Prefect server; 2 or more add a services process "
        "and Redis (default 1: one server process)",
    )
    p.set_defaults(handler=cmd_serve, needs_api=False)


#: Their database connections share the embedded PostgreSQL's 100
#: (``deployments/service/server_tuning.py``).
MAX_API_PROCESSES = 12


def _api_process_count(text: str) -> int:
    """0 or 1 both mean one server process, as Prefect's own ``--workers`` default does."""
    try:
        value = int(text)
    except ValueError:
        value = -1
    if not 0 <= value <= MAX_API_PROCESSES:
        raise argparse.ArgumentTypeError(
            f"expected a number of processes from 0 to {MAX_API_PROCESSES}, got {text!r}"
        )
    return max(1, value)


def _worker_count(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a number of processes >= 1, got {text!r}")
    return value
