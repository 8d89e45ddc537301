"""Background-job benchmark: many short jobs through the API with a type limit.

Run from the repository root::

    python -m bench.jobs_bench                       # 200 jobs of 10 ms, type limit 2 (~3-4 min)
    python -m bench.jobs_bench --runner-baseline 12  # also a Prefect Runner + deployment limit

It starts a Prefect server on embedded PostgreSQL (filesystem lease storage) unless
``PREFECT_API_URL`` is set, and one background executor (``python -m
deployments.service.background``), all on 127.0.0.1, and removes them and its temporary folder
afterwards (``--keep`` keeps the folder, with the executor's log).

Figures:

- jobs/s: jobs ÷ (last job's end - first submission);
- hand-over: for every job that had to wait for a slot, the delay from the moment a slot was
  freed to its start. Two clocks: the job function's own end → next start (from the files the
  jobs write), and Prefect's run end (final state) → next run start (Running). Target: median
  ≤ 2 s (OpenREM's random back-off averages tens of seconds under load).

``--runner-baseline N`` runs N jobs the "Prefect-native" way for comparison: one deployment with
a concurrency limit (ENQUEUE) served by a ``prefect.runner.Runner`` polling every second, on a
server whose ``PREFECT_SERVER_DEPLOYMENTS_CONCURRENCY_SLOT_WAIT_SECONDS`` is 1 (30 by default).
"""

from __future__ import annotations

import argparse
import asyncio
import heapq
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from bench._common import max_overlap, median, stop_process, work_dir
from blocks.host import JOBS_ENV

REPO = Path(__file__).resolve().parents[1]


def handovers(spans: list[tuple[float, float]], limit: int) -> list[float]:
    """Delay from a freed slot to the next start, for each start that needed a freed slot."""
    ends: list[float] = []
    delays: list[float] = []
    for i, (start, end) in enumerate(sorted(spans)):
        if i >= limit and ends:
            freed = heapq.heappop(ends)
            delays.append(start - freed)
        heapq.heappush(ends, end)
    return delays


def describe(values: list[float]) -> str:
    if not values:
        return "n/a"
    q = statistics.quantiles(values, n=10, method="inclusive") if len(values) >= 2 else values
    return (
        f"median {median(values):.2f} s, p10 {q[0]:.2f} s, p90 {q[-1]:.2f} s, "
        f"max {max(values):.2f} s (n={len(values)})"
    )


@contextmanager
def prefect_api(base: Path) -> Iterator[str]:
    if os.environ.get("PREFECT_API_URL"):
        yield os.environ["PREFECT_API_URL"]
        return
    from tests.peers.prefect_server import running_prefect_server

    os.environ.setdefault("PREFECT_SERVER_DEPLOYMENTS_CONCURRENCY_SLOT_WAIT_SECONDS", "1")
    with running_prefect_server(base / "server") as server:
        os.environ["PREFECT_API_URL"] = server.api_url
        yield server.api_url


@contextmanager
def executor(api_url: str, base: Path) -> Iterator[None]:
    log = base / "executor.log"
    env = {**os.environ, "PREFECT_API_URL": api_url, "DICOM_DISPATCH_HOME": str(base / "home")}
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "deployments.service.background"],
            cwd=REPO,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        deadline = time.monotonic() + 60
        while "background executor on" not in log.read_text(errors="replace"):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the executor did not start: {log.read_text()[-2000:]}")
            time.sleep(0.2)
        yield
    finally:
        stop_process(proc, 30)


def run_api_bench(out: Path, jobs: int, limit: int, seconds: float) -> dict[str, Any]:
    from prefect.client.orchestration import get_client

    from flows.background import run_in_background_with_limits, wait_task

    task_type = f"bench-{os.getpid()}"
    warm = run_in_background_with_limits(
        "tests.jobs_fixtures:timed", f"{task_type}-warm", 0, {}, str(out), "warm", "w", 0.0
    )
    wait_task(warm, timeout=120)

    t0 = time.time()
    handles = [
        run_in_background_with_limits(
            "tests.jobs_fixtures:timed",
            task_type,
            0,
            {task_type: limit},
            str(out),
            f"j{i}",
            task_type,
            seconds,
        )
        for i in range(jobs)
    ]
    submitted = time.time() - t0
    for handle in handles:
        record = wait_task(handle, timeout=1800)
        if not record.completed_successfully:
            raise RuntimeError(f"job {record.uuid} failed: {record.error}")
    files = [json.loads((out / f"j{i}.json").read_text()) for i in range(jobs)]
    spans = [(f["start"], f["end"]) for f in files]
    with get_client(sync_client=True) as client:
        runs = [client.read_flow_run(h.uuid) for h in handles]
    run_spans = [
        (r.start_time.timestamp(), r.end_time.timestamp())
        for r in runs
        if r.start_time and r.end_time
    ]
    last_end = max(end for _, end in spans)
    return {
        "jobs": jobs,
        "limit": limit,
        "job_seconds": seconds,
        "submit_per_s": jobs / submitted,
        "jobs_per_s": jobs / (last_end - t0),
        "wall_s": last_end - t0,
        "max_concurrency": max_overlap(spans),
        "handover_function": handovers(spans, limit),
        "handover_run": handovers(run_spans, limit),
    }


async def run_runner_baseline(out: Path, jobs: int, limit: int, seconds: float) -> dict[str, Any]:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.objects import ConcurrencyLimitConfig, ConcurrencyLimitStrategy
    from prefect.runner import Runner
    from prefect.types.entrypoint import EntrypointType

    from tests.jobs_fixtures import runner_job

    runner = Runner(name="jobs-bench", pause_on_shutdown=False, query_seconds=1, limit=None)
    deployment_id = await runner.aadd_flow(
        runner_job,
        name="jobs-bench-runner",
        concurrency_limit=ConcurrencyLimitConfig(
            limit=limit, collision_strategy=ConcurrencyLimitStrategy.ENQUEUE
        ),
        entrypoint_type=EntrypointType.MODULE_PATH,
    )
    task = asyncio.create_task(runner.start())
    t0 = time.time()
    async with get_client() as client:
        for i in range(jobs):
            await client.create_flow_run_from_deployment(
                deployment_id, parameters={"out": str(out), "name": f"r{i}", "seconds": seconds}
            )
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        if all((out / f"r{i}.json").exists() for i in range(jobs)):
            break
        await asyncio.sleep(0.5)
    await runner.astop()
    task.cancel()
    done = [
        json.loads((out / f"r{i}.json").read_text())
        for i in range(jobs)
        if (out / f"r{i}.json").exists()
    ]
    spans = [(f["start"], f["end"]) for f in done]
    return {
        "jobs": len(done),
        "jobs_per_s": len(done) / (max(e for _, e in spans) - t0) if spans else 0.0,
        "handover_function": handovers(spans, limit),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=200)
    parser.add_argument("--limit", type=int, default=2, help="num_of_task_type for the type")
    parser.add_argument("--job-seconds", type=float, default=0.01)
    parser.add_argument("--runner-baseline", type=int, default=0, metavar="N")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder")
    args = parser.parse_args(argv)

    os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
    os.environ[JOBS_ENV] = "tests.jobs_fixtures:timed"  # the bench's job is the test suite's
    figures: dict[str, Any] = {}
    with work_dir("jobs-bench-", keep=args.keep) as base:
        os.environ.setdefault("PREFECT_HOME", str(base / "prefect-home"))
        out = base / "out"
        out.mkdir()
        run_all(args, base, out, figures)
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2))
    return 0


def run_all(args: argparse.Namespace, base: Path, out: Path, figures: dict[str, Any]) -> None:
    with prefect_api(base) as api_url:
        from prefect import __version__ as prefect_version

        from deployments.service.background import ExecutorSettings

        settings = asyncio.run(ExecutorSettings.aload())
        print(
            f"settings: prefect {prefect_version}, python {platform.python_version()}, "
            f"{os.cpu_count()} CPUs, executor poll {settings.poll_seconds} s, lease "
            f"{settings.lease_seconds:.0f} s, max processes {settings.max_processes}, "
            f"{args.jobs} jobs of {args.job_seconds * 1000:.0f} ms, type limit {args.limit}, "
            f"API {api_url}",
            flush=True,
        )
        with executor(api_url, base):
            figures["api"] = run_api_bench(out, args.jobs, args.limit, args.job_seconds)
        api = figures["api"]
        print(
            f"background jobs: {api['jobs_per_s']:.2f} jobs/s ({api['wall_s']:.1f} s), "
            f"submitted at {api['submit_per_s']:.1f} jobs/s, max concurrency "
            f"{api['max_concurrency']} (limit {args.limit})"
        )
        print(f"  hand-over, function end -> next start: {describe(api['handover_function'])}")
        print(f"  hand-over, run end -> next run start:  {describe(api['handover_run'])}")
        if args.runner_baseline:
            slot_wait = os.environ.get("PREFECT_SERVER_DEPLOYMENTS_CONCURRENCY_SLOT_WAIT_SECONDS")
            figures["runner"] = asyncio.run(
                run_runner_baseline(out, args.runner_baseline, args.limit, args.job_seconds)
            )
            runner = figures["runner"]
            print(
                f"runner baseline (deployment limit {args.limit}, runner poll 1 s, server slot "
                f"wait {slot_wait or 'server default'} s): {runner['jobs_per_s']:.2f} jobs/s"
            )
            print(
                f"  hand-over, function end -> next start: {describe(runner['handover_function'])}"
            )


if __name__ == "__main__":
    sys.exit(main())
