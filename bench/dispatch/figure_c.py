"""Figure (c): per-case orchestration, the median wall time of one ``dispatch_case`` flow run to a
DummyTarget (no transfer), with and without the service's tag limit, beside an empty flow run."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

from bench._common import fmt_runs, median, say
from bench.dispatch.config import TARGET_C_MS, Config
from bench.dispatch.data import make_cases
from bench.dispatch.meters import ApiTrace, CpuMeter
from bench.dispatch.prefect_setup import (
    save_settings,
    save_target,
    set_service_limits,
    time_case_run,
)
from bench.dispatch.report import Report, mark, print_trace

DB_LABELS = {"postgres": "PostgreSQL (embedded)", "sqlite": "SQLite"}


def _empty_flow() -> Callable[[], Awaitable[None]]:
    from prefect import flow

    @flow(name="bench_empty", persist_result=False)
    async def bench_empty() -> None:
        return None

    return bench_empty


async def figure_c(cfg: Config, out: Report, base: Path, db: str, runs: int) -> None:
    from blocks.dummy import DummyTarget

    settings = await save_settings(base)
    await save_target(DummyTarget(), "bench_dummy")
    outgoing = settings.folders()[0]
    empty = _empty_flow()

    async def case_runs(n: int) -> list[float]:
        cases = await asyncio.to_thread(
            make_cases, outgoing, n, ["bench_dummy"], files=1, rows=32, cols=32
        )
        times = []
        for case in cases:
            elapsed, ok = await time_case_run(case, settings)
            times.append(elapsed)
            if not ok:
                raise RuntimeError(f"(c) case {case.name} did not reach success/")
        return times

    async def empty_runs(n: int) -> list[float]:
        times = []
        for _ in range(n):
            started = time.perf_counter()
            await empty()
            times.append(time.perf_counter() - started)
        return times

    await set_service_limits(settings, on=True)
    await case_runs(2)  # warm-up: client, block caches, first run of each flow
    await empty_runs(2)
    empty_t = await empty_runs(runs)
    with ApiTrace() as trace, CpuMeter() as cpu:
        limited = await case_runs(runs)
    await set_service_limits(settings, on=False)
    await case_runs(1)
    unlimited = await case_runs(runs)
    await set_service_limits(settings, on=True)

    label = DB_LABELS[db]
    say(f"(c) {label}: dispatch_case flow run to a DummyTarget, median of {runs} (sequential)")
    say(
        f"    with the service's tag limit (dicom-dispatch=8)  {median(limited) * 1e3:7.0f} ms"
        f"{mark(median(limited) * 1e3, TARGET_C_MS)}   runs {fmt_runs(limited, 1e3, 0)}"
    )
    say(
        f"    without tag limits                              {median(unlimited) * 1e3:7.0f} ms"
        f"   runs {fmt_runs(unlimited, 1e3, 0)}"
    )
    say(
        f"    empty async flow run (reference)                {median(empty_t) * 1e3:7.0f} ms"
        f"   runs {fmt_runs(empty_t, 1e3, 0)}"
    )
    out.put(f"c.{db}.case_limited.ms", round(median(limited) * 1e3, 1))
    out.put(f"c.{db}.case_unlimited.ms", round(median(unlimited) * 1e3, 1))
    out.put(f"c.{db}.empty_flow.ms", round(median(empty_t) * 1e3, 1))
    say(f"    {cpu.line(runs)} (with the limit)")
    out.put(f"c.{db}.cpu_ms_per_case", cpu.per_case_ms(runs))
    out.put(f"c.{db}.api", print_trace(trace, runs, "per case (with the limit)"))
