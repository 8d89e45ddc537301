"""``dicom-dispatch``: the command line (architecture §4.5).

Exit codes: 0 success, 1 the operation failed (case not in success/, target unusable, bad config),
2 usage error. Errors are one line on stderr. Prefect is imported only by the commands that
need it, after the data directory and the API have been chosen, so ``--help`` is instant.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Coroutine, Sequence
from pathlib import Path
from typing import Any

from blocks.errors import DispatchError
from deployments.environment import choose_api, prepare_environment, read_service_record

__all__ = ["main"]

Handler = Callable[[argparse.Namespace, Path], Coroutine[Any, Any, int]]


class UsageError(Exception):
    """A user mistake on the command line (exit 2)."""


def _print_json(data: Any) -> None:
    print(json.dumps(data, indent=2, default=str))


def _human(rows: Sequence[Sequence[Any]], header: Sequence[str]) -> None:
    cells = [list(map(str, header)), *[[str(c) for c in r] for r in rows]]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    for row in cells:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())


# --------------------------------------------------------------------------- commands


async def cmd_import_config(args: argparse.Namespace, home: Path) -> int:
    from blocks.registry import aregister_block_types
    from deployments.importer import import_mercure_config

    await aregister_block_types()
    report = await import_mercure_config(Path(args.mercure_json))
    if args.json:
        _print_json(report.as_dict())
    else:
        for name, kind in report.imported.items():
            print(f"imported  {name} ({kind})")
        for name, why in report.skipped.items():
            print(f"skipped   {name}: {why}")
        for name, keys in report.ignored_fields.items():
            print(f"note      {name}: fields not used: {', '.join(keys)}")
        print("settings  updated (DispatcherSettings 'default')")
        print(f"cleaning  {report.cleaning['summary']}")
    return 0


async def cmd_targets_list(args: argparse.Namespace, home: Path) -> int:
    from blocks.registry import alist_targets

    targets = await alist_targets()
    rows = [
        (
            t.target_name or t._block_document_name,
            t.target_type,
            t._block_document_name,
            t.direction,
        )
        for t in targets
    ]
    if args.json:
        _print_json(
            [dict(zip(("name", "type", "block", "direction"), r, strict=True)) for r in rows]
        )
    else:
        _human(rows, ("NAME", "TYPE", "BLOCK", "DIRECTION"))
    return 0


async def cmd_targets_test(args: argparse.Namespace, home: Path) -> int:
    from blocks.registry import aload_target

    target = await aload_target(args.name)
    result = await asyncio.to_thread(target.test_connection)
    _print_json(result)
    return 0 if target.connection_ok(result) else 1


async def cmd_dispatch(args: argparse.Namespace, home: Path) -> int:
    from flows.dispatch import run_dispatch

    result = await run_dispatch(args.case)
    if args.json:
        _print_json(result)
    else:
        print(f"{result['case_id']}: {result['location']} ({result['path']})")
        if result.get("reason"):
            print(f"  reason: {result['reason']}")
    return 0 if result["location"] == "success" else 1


async def cmd_sweep(args: argparse.Namespace, home: Path) -> int:
    from flows.sweep import sweep_outgoing

    ok = True
    total = 0
    while True:
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
        _print_json({"dispatched": total, "all_succeeded": ok})
    return 0 if ok else 1


async def cmd_status(args: argparse.Namespace, home: Path) -> int:
    from blocks.registry import aload_settings
    from tasks import casefolder as cf

    settings = await aload_settings()
    outgoing, success, error = settings.folders()
    scan = cf.scan_outgoing(outgoing, rule_priorities=settings.rule_priorities, invalid_grace=1e18)
    record = read_service_record(home)

    def count(folder: Path) -> int:
        return sum(1 for p in folder.iterdir() if p.is_dir()) if folder.is_dir() else 0

    status = {
        "halted": scan.halted,
        "outgoing": {
            "folder": str(outgoing),
            "ready": len(scan.ready),
            "waiting_for_retry": len(scan.not_due),
            "running": [p.name for p in scan.claimed],
            "locked": len(scan.busy),
            "invalid": len(scan.invalid),
        },
        "success": {"folder": str(success), "cases": count(success)},
        "error": {"folder": str(error), "cases": count(error)},
        "service": record or None,
        "api_url": os.environ.get("PREFECT_API_URL") or "ephemeral",
    }
    if args.json:
        _print_json(status)
    else:
        print(f"dispatching: {'HALTED' if scan.halted else 'on'}")
        counts = (
            f"ready {len(scan.ready)}, waiting {len(scan.not_due)}, running {len(scan.claimed)}, "
            f"locked {len(scan.busy)}, invalid {len(scan.invalid)}"
        )
        print(f"outgoing:    {outgoing}  {counts}")
        print(f"success:     {success}  {count(success)} case(s)")
        print(f"error:       {error}  {count(error)} case(s)")
        print(f"service:     {record['ui_url'] if record else 'not running'}")
    return 0


async def _set_halt(on: bool) -> int:
    from blocks.registry import aload_settings
    from tasks import casefolder as cf

    outgoing = (await aload_settings()).folders()[0]
    outgoing.mkdir(parents=True, exist_ok=True)
    (cf.halt if on else cf.unhalt)(outgoing)
    print(f"dispatching {'halted' if on else 'resumed'} ({outgoing / cf.HALT})")
    return 0


async def cmd_halt(args: argparse.Namespace, home: Path) -> int:
    return await _set_halt(True)


async def cmd_unhalt(args: argparse.Namespace, home: Path) -> int:
    return await _set_halt(False)


# --------------------------------------------------------------------------- parser


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dicom-dispatch",
        description="Deliver DICOM cases from a mercure outgoing folder, orchestrated by Prefect.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("import-config", help="mercure.json targets/settings -> blocks")
    p.add_argument("mercure_json", metavar="MERCURE_JSON")
    p.add_argument("--json", action="store_true")
    p.set_defaults(handler=cmd_import_config)

    targets = sub.add_parser("targets", help="list or test targets")
    tsub = targets.add_subparsers(dest="targets_command", required=True, metavar="ACTION")
    p = tsub.add_parser("list", help="list the target blocks")
    p.add_argument("--json", action="store_true")
    p.set_defaults(handler=cmd_targets_list)
    p = tsub.add_parser("test", help="test a target's connection (exit 0 if usable)")
    p.add_argument("name", metavar="NAME")
    p.set_defaults(handler=cmd_targets_test)

    p = sub.add_parser("dispatch", help="one attempt for one case now")
    p.add_argument("case", metavar="CASE")
    p.add_argument("--json", action="store_true")
    p.set_defaults(handler=cmd_dispatch)

    p = sub.add_parser("sweep", help="dispatch every ready case now and wait")
    p.add_argument(
        "--until-empty",
        action="store_true",
        help="repeat, waiting for retries, until nothing is ready or due",
    )
    p.add_argument("--json", action="store_true")
    p.set_defaults(handler=cmd_sweep)

    p = sub.add_parser("status", help="cases per folder, HALT, running cases, service URL")
    p.add_argument("--json", action="store_true")
    p.set_defaults(handler=cmd_status)

    p = sub.add_parser("halt", help="create outgoing/HALT")
    p.set_defaults(handler=cmd_halt)
    p = sub.add_parser("unhalt", help="remove outgoing/HALT")
    p.set_defaults(handler=cmd_unhalt)

    from deployments.jobs_cli import add_jobs_parser
    from deployments.query_cli import add_query_parsers

    add_query_parsers(sub)
    add_jobs_parser(sub)

    p = sub.add_parser("serve", help="run the service (Prefect server + UI, dispatcher loop)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=4200)
    p.add_argument(
        "--db",
        choices=("postgres", "sqlite"),
        default="postgres",
        help="database of the embedded Prefect server (default: postgres)",
    )
    p.set_defaults(handler=None)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    home = prepare_environment()
    try:
        if args.command == "serve":
            return _serve(args, home)
        choose_api(home, getattr(args, "db", "postgres"))
        handler: Handler = args.handler
        return asyncio.run(handler(args, home))
    except UsageError as exc:
        print(f"dicom-dispatch: {exc}", file=sys.stderr)
        return 2
    except DispatchError as exc:
        print(f"dicom-dispatch: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


def _serve(args: argparse.Namespace, home: Path) -> int:
    """Run the service in a worker thread; the main thread only turns signals into a stop.

    Prefect's flow engine swaps its own SIGTERM handler in and out around every flow run it
    runs in the main thread; with many concurrent in-process case runs that would race with
    ours. Off the main thread the engine leaves signals alone.
    """
    from deployments.serve import is_loopback, serve

    if not is_loopback(args.host) and not os.environ.get("PREFECT_SERVER_API_AUTH_STRING"):
        raise UsageError(
            f"refusing to serve on {args.host}: block secrets would be readable through the API; "
            "set PREFECT_SERVER_API_AUTH_STRING or bind to 127.0.0.1"
        )
    stop = threading.Event()
    outcome: list[int] = []

    def run() -> None:
        outcome.append(asyncio.run(serve(home, args.host, args.port, args.db, stop)))

    worker = threading.Thread(target=run, name="dicom-dispatch-service")
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    worker.start()
    while worker.is_alive():
        worker.join(0.5)
    return outcome[0] if outcome else 1


if __name__ == "__main__":
    sys.exit(main())
