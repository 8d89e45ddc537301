"""Dispatch benchmark: our figures beside DCMTK's ``dcmsend`` on the same data, in the same run.

Run from the repository root::

    python -m bench.dispatch_bench            # full (~5-8 min on 2 cores)
    python -m bench.dispatch_bench --quick    # ~2-3 min

It starts its own peers on 127.0.0.1 and removes them afterwards: DCMTK ``storescp`` (with
``TCP_NODELAY=1``; one without ``--fork`` and one with ``--fork`` for parallel associations), a
Prefect server on embedded PostgreSQL, then one on SQLite for figure (c).

Figures:

(a) One case of 200 CT images 512x512 (~0.5 MB each): ``DicomTarget.send()`` (the transfer) and
    the whole ``dispatch_case`` flow run, each ÷ the wall time of mercure's ``dcmsend`` command
    on the same folder. pynetdicom with 1 association (storescp), 2 and 4 associations
    (storescp --fork), and the ``dcmsend`` backend. Target: ≤ 1.5.
(b) 500 cases × 5 images 64x64 through the service's in-process dispatcher
    (``flows.sweep.Dispatcher`` on the PostgreSQL server, ``DispatcherSettings`` "default" with
    num_proc 8, the service's tag limits applied) ÷ a sequential ``dcmsend``-per-case loop over a
    copy of the same folders (mercure's model, without its 1 s scan interval), in cases/s.
    Target: ≥ 1.0. Also the peak RSS of this process during (b). Target: ≤ 500 MB.
(c) Per-case orchestration: median wall time of a ``dispatch_case`` flow run to a DummyTarget
    (no transfer), on PostgreSQL and on SQLite, with the service's tag limit (``dicom-dispatch``
    = num_proc) and without; an empty async flow run for reference; and the Prefect API requests
    one case makes. Target: ≤ 150 ms.

This module runs the figures in order; the pieces are in ``bench/dispatch/`` (one module per
figure, the data, the peers, the meters and the report). The guard ``if __name__ ==
"__main__":`` matters: parallel DIMSE sends use a forkserver pool,
whose workers import ``__main__``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from bench._common import say, work_dir
from bench.dispatch.config import Config, config
from bench.dispatch.data import make_data
from bench.dispatch.dcmsend import dcmsend_binary, storescp
from bench.dispatch.figure_a import figure_a_flow, figure_a_send
from bench.dispatch.figure_b import figure_b
from bench.dispatch.figure_c import figure_c
from bench.dispatch.prefect_setup import (
    prefect_server,
    prepare_environment,
    register_blocks,
    save_settings,
)
from bench.dispatch.report import Report


async def postgres_phase(
    cfg: Config,
    out: Report,
    work: Path,
    only: set[str],
    a_data: tuple[Path, float] | None,
    plain: Any,
    forked: Any,
    binary: str,
    b_cases: list[Path],
) -> None:
    await register_blocks()
    if "c" in only:
        await figure_c(cfg, out, work / "c-postgres", "postgres", cfg.c_runs)
        say()
    if a_data is not None:
        big, dcmsend_s = a_data
        settings = await save_settings(work / "a")
        await figure_a_flow(cfg, out, big, settings, plain, forked, dcmsend_s)
        say()
    if "b" in only:
        await figure_b(cfg, out, work / "b", b_cases, plain, binary)
        say()


async def sqlite_phase(cfg: Config, out: Report, work: Path) -> None:
    await register_blocks()
    await figure_c(cfg, out, work / "c-sqlite", "sqlite", cfg.c_runs_sqlite)
    say()


def versions(binary: str) -> str:
    """The versions a reader needs to compare runs (Prefect and pynetdicom are imported here,
    after ``prepare_environment``)."""
    lines = subprocess.run(
        [binary, "--version"], capture_output=True, text=True, check=False
    ).stdout.splitlines()
    import prefect
    import pynetdicom

    return (
        f"{lines[0] if lines else 'dcmsend'}; pynetdicom {pynetdicom.__version__}; "
        f"prefect {prefect.__version__}; Python {sys.version.split()[0]}"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer cases and repetitions")
    parser.add_argument("--json", type=Path, help="also write every figure to this JSON file")
    parser.add_argument("--keep", action="store_true", help="keep the work directory")
    parser.add_argument(
        "--only", default="abc", help="figures to measure, e.g. 'b' or 'ac' (default: abc)"
    )
    args = parser.parse_args(argv)
    only = set(args.only) & set("abc")
    if not only or set(args.only) - set("abc"):
        parser.error("--only takes letters from 'abc'")
    cfg = config(args.quick)
    with work_dir("dispatch-bench-", keep=args.keep) as work:
        prepare_environment(work)
        run(cfg, work, only, args.json)
    return 0


def run(cfg: Config, work: Path, only: set[str], json_path: Path | None) -> None:
    out = Report()
    started = time.perf_counter()
    binary = dcmsend_binary()
    say(
        f"dispatch benchmark ({'quick' if cfg.quick else 'full'}); {os.cpu_count()} CPUs; "
        f"{versions(binary)}"
    )
    say("    making test data ...")
    data = make_data(cfg, work, only)
    say(f"    [data ready in {time.perf_counter() - started:.0f} s]")
    say()
    with (
        storescp(work / "scp-plain", fork=False) as plain,
        storescp(work / "scp-fork", fork=True) as forked,
    ):
        a_data = None
        if data.big and data.warm:
            med = figure_a_send(cfg, out, data.big, data.warm, plain, forked, binary)
            a_data = (data.big, med["dcmsend"])
            say()
        with prefect_server(work / "server-postgres", "postgres"):
            asyncio.run(
                postgres_phase(
                    cfg, out, work, only, a_data, plain, forked, binary, data.mercure_cases
                )
            )
        if "c" in only:
            with prefect_server(work / "server-sqlite", "sqlite"):
                asyncio.run(sqlite_phase(cfg, out, work))
    say(f"total {time.perf_counter() - started:.0f} s")
    if json_path:
        json_path.write_text(json.dumps(out.figures, indent=2) + "\n")


if __name__ == "__main__":
    sys.exit(main())
