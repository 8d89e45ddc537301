"""Scale-out benchmark: ``dicom-dispatch serve --workers N`` for N = 1, 2, 3 on one machine.

Run from the repository root::

    python -m bench.scaleout_bench              # 100 cases x 5 images per N (~5 min on 2 cores)
    python -m bench.scaleout_bench --cases 50 --workers 1,2

Each N runs a real ``serve`` process (its N-1 children included) against one Prefect server on
embedded PostgreSQL, sending the same 100 cases x 5 CT 64x64 images to DCMTK ``storescp --fork``
(parallel associations). The cases are put into outgoing/ (one rename each) after the service is
up; the clock runs until the last one is in success/. Figures per N:

- cases/s and the ratio to N = 1 (target on 2 cores: N = 2 >= 1.3x);
- the wall time ÷ a sequential ``dcmsend`` loop over a copy of the same cases (mercure's
  model; target <= 5.0);
- CPU seconds per case of the dispatcher processes, the Prefect server and PostgreSQL, and the
  ceiling they imply: cores ÷ CPU-s per case (target: N = 2 reaches >= 80 % of it);
- the peak RSS of each dispatcher process.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from bench._common import say, stop_process, work_dir
from bench.dispatch.dcmsend import dcmsend_binary, dcmsend_loop, storescp
from bench.dispatch.meters import SERVER_PROCESSES, tree_cpu
from bench.dispatch.prefect_setup import (
    dicom_target,
    prefect_server,
    prepare_environment,
    register_blocks,
    save_settings,
    save_target,
)

TARGET = "bench_scale"
TARGET_SPEEDUP_2 = 1.3
TARGET_CEILING = 0.8
TARGET_VS_DCMSEND = 5.0


class TreeSampler:
    """CPU seconds and peak RSS of every process in a ``serve`` tree (the dispatchers)."""

    def __init__(self, pid: int) -> None:
        import psutil

        self.root = psutil.Process(pid)
        self.peak_rss: dict[int, int] = {}
        self.cpu: dict[int, float] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _sample(self) -> None:
        import psutil

        try:
            procs = [self.root, *self.root.children(recursive=True)]
        except psutil.NoSuchProcess:
            return
        for proc in procs:
            try:
                rss = proc.memory_info().rss
                times = proc.cpu_times()
            except psutil.NoSuchProcess:
                continue
            self.peak_rss[proc.pid] = max(self.peak_rss.get(proc.pid, 0), rss)
            self.cpu[proc.pid] = float(times.user + times.system)

    def _run(self) -> None:
        while not self._stop.is_set():
            self._sample()
            self._stop.wait(0.1)

    def __enter__(self) -> TreeSampler:
        self._sample()
        self._start = dict(self.cpu)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()

    def cpu_used(self) -> float:
        return sum(v - self._start.get(pid, 0.0) for pid, v in self.cpu.items())


def wait_until(check: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out waiting for {what}")
        time.sleep(0.05)


def one_run(
    workers: int, base: Path, template: Path, api_url: str, cases: int, port: int
) -> dict[str, Any]:
    settings = asyncio.run(save_settings(base, num_proc=8, dispatcher_scan_interval=0.1))
    asyncio.run(save_target(dicom_target(port), TARGET))
    outgoing, success, _ = settings.folders()
    staging = base / "staging"
    shutil.copytree(template, staging)
    env = {
        **os.environ,
        "PREFECT_API_URL": api_url,
        "DICOM_DISPATCH_HOME": str(base / "home"),
        "PREFECT_LOGGING_HANDLERS_CONSOLE_LEVEL": "WARNING",
    }
    log = base / "serve.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "deployments.cli", "serve", "--workers", str(workers)],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        wait_until(lambda: b"dispatching from" in log.read_bytes(), 180, "serve")
        time.sleep(5 + 3 * workers)  # the children import Prefect and start their loops
        server_cpu = {name: tree_cpu(pid) for name, pid in SERVER_PROCESSES.items()}
        with TreeSampler(proc.pid) as tree:
            started = time.perf_counter()
            for case in sorted(staging.iterdir()):
                os.rename(case, outgoing / case.name)
            wait_until(lambda: len(os.listdir(success)) >= cases, 900, "every case in success/")
            wall = time.perf_counter() - started
        server_used = {
            name: tree_cpu(pid) - server_cpu[name] for name, pid in SERVER_PROCESSES.items()
        }
    finally:
        stop_process(proc, 120)
    per_case = {"dispatchers": tree.cpu_used() / cases}
    per_case.update({name: used / cases for name, used in server_used.items()})
    return {
        "workers": workers,
        "wall_s": wall,
        "cases_per_s": cases / wall,
        "cpu_s_per_case": per_case,
        "peak_rss_mb": sorted(round(v / 2**20) for v in tree.peak_rss.values()),
        # Other work on the machine takes cores from the ceiling: say how much there was.
        "load_average_1m": os.getloadavg()[0],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", type=int, default=100)
    parser.add_argument("--workers", default="1,2,3", help="comma-separated N values")
    parser.add_argument("--json", type=Path, help="also write the figures to this JSON file")
    parser.add_argument("--keep", action="store_true", help="keep the work directory")
    args = parser.parse_args(argv)
    counts = [int(n) for n in args.workers.split(",")]
    with work_dir("scaleout-bench-", keep=args.keep) as work:
        prepare_environment(work)
        figures = run(work, args.cases, counts)
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2) + "\n")
    return 0


def run(work: Path, cases: int, counts: list[int]) -> dict[str, Any]:
    from bench.dispatch.data import make_cases
    from deployments.service.dispatchers import available_cpus

    cores = available_cpus()
    binary = dcmsend_binary()
    say(f"scale-out benchmark: {cases} cases x 5 CT 64x64 per run; {cores} CPUs for this process")
    template = work / "template"
    make_cases(template, cases, [TARGET], files=5, rows=64, cols=64)
    mercure = work / "mercure"
    shutil.copytree(template, mercure)
    results: list[dict[str, Any]] = []
    with (
        storescp(work / "scp", fork=True) as scp,
        prefect_server(work / "server", "postgres") as api_url,
    ):
        asyncio.run(register_blocks())
        dcmsend_s = dcmsend_loop(binary, sorted(mercure.iterdir()), scp.port)
        say(f"    sequential dcmsend loop: {cases / dcmsend_s:6.1f} cases/s ({dcmsend_s:.1f} s)")
        for n in counts:
            result = one_run(n, work / f"n{n}", template, api_url, cases, scp.port)
            results.append(result)
            report(result, results[0], dcmsend_s, cores)
    return {"cases": cases, "cores": cores, "dcmsend_loop_s": dcmsend_s, "runs": results}


def report(result: dict[str, Any], first: dict[str, Any], dcmsend_s: float, cores: int) -> None:
    n = result["workers"]
    cpu = result["cpu_s_per_case"]
    total = sum(cpu.values())
    ceiling = cores / total if total else float("inf")
    speedup = result["cases_per_s"] / first["cases_per_s"]
    vs_dcmsend = result["wall_s"] / dcmsend_s
    of_ceiling = result["cases_per_s"] / ceiling
    result.update(
        speedup=speedup, vs_dcmsend=vs_dcmsend, ceiling_cases_per_s=ceiling, of_ceiling=of_ceiling
    )
    marks = []
    if n == 2:
        marks.append(
            f"speed-up target >= {TARGET_SPEEDUP_2}: {'ok' if speedup >= 1.3 else 'MISSED'}"
        )
        marks.append(f"ceiling >= 80 %: {'ok' if of_ceiling >= TARGET_CEILING else 'MISSED'}")
    say(
        f"--workers {n}: {result['cases_per_s']:6.1f} cases/s ({result['wall_s']:.1f} s), "
        f"{speedup:4.2f}x --workers 1, {vs_dcmsend:4.2f}x the dcmsend loop's time"
        f"{' (target <= 5.0: ' + ('ok' if vs_dcmsend <= TARGET_VS_DCMSEND else 'MISSED') + ')'}"
    )
    parts = ", ".join(f"{k} {v * 1e3:.0f}" for k, v in cpu.items())
    say(
        f"    CPU ms per case: {parts}; total {total * 1e3:.0f} -> ceiling {ceiling:.1f} cases/s "
        f"on {cores} cores; reached {of_ceiling:.0%}"
    )
    say(
        f"    peak RSS per process (MB): {result['peak_rss_mb']}" + "".join(f"; {m}" for m in marks)
    )
    say(f"    load average (1 min) at the end: {result['load_average_1m']:.1f}")


if __name__ == "__main__":
    sys.exit(main())
