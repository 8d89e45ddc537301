"""Service benchmark: ``dicom-dispatch serve`` as a new user runs it, beside DCMTK in one run.

Run from the repository root::

    python -m bench.service_bench            # full (~15 min on 2 cores)
    python -m bench.service_bench --quick    # fewer and smaller cases

``import-config`` of a plain mercure.json (one DICOM target, one dummy target, no tuning), then
``dicom-dispatch serve`` on the embedded default (its own data directory: embedded PostgreSQL,
the UI, the deployments, the dispatcher loop). The receiver is DCMTK ``storescp`` with
``TCP_NODELAY=1`` and without ``--fork`` (one association at a time, as many PACS). Cases are
folders moved into outgoing/; the benchmark watches success/.

(a) 5 cases × 200 CT 512² (0.5 MB each) dropped at once ÷ a sequential ``dcmsend`` per case
    (mercure's model) over copies of the same folders. Target ≤ 1.2.
(b) 100 cases × 5 small images dropped at once ÷ the same loop (target ≤ 6.0), and our cases/s ÷
    empty async flow runs/s from one process, 8 at once (num_proc's default; target ≥ 0.8).
    Peak RSS of the dispatcher process (target ≤ 500 MB), the Prefect server and PostgreSQL.
(c) Wall time per case (readiness → its flow run final), cases one at a time to a Dummy
    target, ÷ the wall time of an empty async flow run against the same server, interleaved.
    Target ≤ 1.25.
(d) Readiness (``.lock`` removed) → claim (``.processing`` created): median and p95, ≤ 100 ms.
(e) Retrieve of one 200 × 0.5 MB study from Orthanc with ``retrieve_backend`` auto ÷ ``getscu``.
    Target ≤ 1.2.
(f) What one small case costs, cases one at a time, beside an empty async flow run against the
    same server: API requests by route (the server's access log), events by name (its events
    table), CPU per process group (dispatchers, dcmsend, Prefect server, PostgreSQL, the empty
    runs' client); ready → success/ p50/p95 beside the empty run's wall and dcmsend alone.
(g) A model of mercure 0.4.1's dispatcher loop, "tuned" (TCP_NODELAY=1) and "as shipped", on
    the workloads of (a), (b) and (f), with its CPU per small case; serve ÷ each. Runs (f) too.
(h) 200 small cases (quick: 40) dropped at once into ``serve`` with its defaults and then into
    ``serve --api-processes 2 --workers 2``, each with a receiver that keeps every copy: wall
    time, duplicates and missing instances, the tag limits held (most sends at once ÷ limit),
    CPU per case by process kind (README's capacity table).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from bench._common import say, work_dir

FIGURES = "abcdefgh"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer and smaller cases")
    parser.add_argument("--only", default=FIGURES, help=f"figures to measure (default: {FIGURES})")
    parser.add_argument("--json", type=Path, help="also write every figure to this JSON file")
    parser.add_argument("--keep", action="store_true", help="keep the work directory")
    args = parser.parse_args(argv)
    only = set(args.only)
    if not only or only - set(FIGURES):
        parser.error(f"--only takes letters from '{FIGURES}'")
    if "g" in only:
        only.add("f")  # (g) compares with (f)'s per-case figures
    from bench.dispatch.prefect_setup import prepare_environment

    with work_dir("service-bench-", keep=args.keep) as work:
        prepare_environment(work)
        run(work, only, args.quick, args.json)
    return 0


def run(work: Path, only: set[str], quick: bool, json_path: Path | None) -> None:
    from bench.dispatch import service_figures as fig
    from bench.dispatch.dcmsend import dcmsend_binary, storescp
    from bench.dispatch.figure_account import figure_f
    from bench.dispatch.figure_mercure import figure_g, sizes
    from bench.dispatch.figure_multi import figure_h
    from bench.dispatch.report import Report
    from bench.dispatch.service import running_service

    out = Report()
    started = time.perf_counter()
    binary = dcmsend_binary()
    say(f"service benchmark ({'quick' if quick else 'full'}); {os.cpu_count()} CPUs")
    size = sizes(quick)  # (g) reuses the serve numbers of (a), (b) and (f): the same sizes
    with storescp(work / "scp", fork=False) as scp:
        port = scp.port
        if only & set("abcdfg"):
            access_log = "f" in only
            with running_service(work / "service", port, access_log) as service:
                say(
                    "    `dicom-dispatch serve`, defaults (--workers: the CPUs, at most 4)"
                    + ("; server at log level INFO for its access log" if access_log else "")
                )
                if "d" in only or "c" in only:
                    fig.figure_cd(service, out, 10 if quick else 25)
                if "a" in only:
                    fig.figure_a(service, out, binary, port, size["big_cases"], size["big_files"])
                if "b" in only:
                    fig.figure_b(service, out, binary, port, size["small_cases"])
                if "f" in only:
                    figure_f(service, out, binary, port, size["one_cases"], 10 if quick else 20)
                if "g" in only:
                    figure_g(service, out, binary, port, size)
    if "h" in only:
        figure_h(work / "h", out, 40 if quick else 200)
    if "e" in only:
        fig.figure_e(work / "e", out, 100 if quick else 200, 2 if quick else 3)
    say(f"total {time.perf_counter() - started:.0f} s")
    if json_path:
        json_path.write_text(json.dumps(out.figures, indent=2) + "\n")


if __name__ == "__main__":
    sys.exit(main())
