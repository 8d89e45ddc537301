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
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from bench._common import say, work_dir


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer and smaller cases")
    parser.add_argument("--only", default="abcde", help="figures to measure (default: abcde)")
    parser.add_argument("--json", type=Path, help="also write every figure to this JSON file")
    parser.add_argument("--keep", action="store_true", help="keep the work directory")
    args = parser.parse_args(argv)
    only = set(args.only)
    if not only or only - set("abcde"):
        parser.error("--only takes letters from 'abcde'")
    from bench.dispatch.prefect_setup import prepare_environment

    with work_dir("service-bench-", keep=args.keep) as work:
        prepare_environment(work)
        run(work, only, args.quick, args.json)
    return 0


def run(work: Path, only: set[str], quick: bool, json_path: Path | None) -> None:
    from bench.dispatch import service_figures as fig
    from bench.dispatch.dcmsend import dcmsend_binary, storescp
    from bench.dispatch.report import Report
    from bench.dispatch.service import running_service

    out = Report()
    started = time.perf_counter()
    binary = dcmsend_binary()
    say(f"service benchmark ({'quick' if quick else 'full'}); {os.cpu_count()} CPUs")
    with storescp(work / "scp", fork=False) as scp:
        if only & set("abcd"):
            with running_service(work / "service", scp.port) as service:
                say("    `dicom-dispatch serve` (no --workers on this version: one process)")
                if "d" in only or "c" in only:
                    fig.figure_cd(service, out, 10 if quick else 25)
                if "a" in only:
                    fig.figure_a(service, out, binary, scp.port, 5, 100 if quick else 200)
                if "b" in only:
                    fig.figure_b(service, out, binary, scp.port, 40 if quick else 100)
    if "e" in only:
        fig.figure_e(work / "e", out, 100 if quick else 200, 2 if quick else 3)
    say(f"total {time.perf_counter() - started:.0f} s")
    if json_path:
        json_path.write_text(json.dumps(out.figures, indent=2) + "\n")


if __name__ == "__main__":
    sys.exit(main())
