"""Figure (b): many small cases through the service's dispatcher loop, cases/s ÷ a sequential
``dcmsend``-per-case loop (mercure's model), and the peak RSS meanwhile."""

from __future__ import annotations

import asyncio
import logging
import os
import time
from pathlib import Path
from typing import Any

from bench._common import RssSampler, max_rss_mb, median, say
from bench.dispatch.config import TARGET_B, TARGET_B_RSS_MB, Config
from bench.dispatch.dcmsend import dcmsend_loop
from bench.dispatch.meters import ApiTrace, CpuMeter
from bench.dispatch.prefect_setup import (
    dicom_target,
    save_settings,
    save_target,
    set_service_limits,
)
from bench.dispatch.report import Report, mark, print_trace


class _ScanRaceCounter(logging.Filter):
    """Counts (and keeps off the console) the dispatcher's "could not be moved to error/" errors.

    They come from a race in the scan: a case that finishes (moved to success/) between the
    listing of outgoing/ and the read of its task.json looks like an invalid, long-unchanged
    folder. The case itself is fine; the count is printed with (b).
    """

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def filter(self, record: logging.LogRecord) -> bool:
        if "could not be moved to error/" in record.getMessage():
            self.count += 1
            return False
        return True


async def figure_b(
    cfg: Config, out: Report, base: Path, mercure_copy: list[Path], plain: Any, binary: str
) -> None:
    from flows.sweep import Dispatcher

    settings = await save_settings(base, num_proc=8, dispatcher_scan_interval=0.1)
    await save_target(dicom_target(plain.port), "bench_b")
    applied = await set_service_limits(settings, on=True)
    outgoing, success, error = settings.folders()
    n = len(mercure_copy)

    mercure_s = await asyncio.to_thread(dcmsend_loop, binary, mercure_copy, plain.port)

    scans: list[float] = []

    class TimedDispatcher(Dispatcher):
        async def ready_cases(self) -> Any:
            started = time.perf_counter()
            try:
                return await super().ready_cases()
            finally:
                scans.append(time.perf_counter() - started)

    dispatcher = TimedDispatcher(settings)
    stop = asyncio.Event()
    race = _ScanRaceCounter()
    logging.getLogger("flows.sweep").addFilter(race)
    with RssSampler() as rss, ApiTrace() as trace, CpuMeter() as cpu:
        started = time.perf_counter()
        loop_task = asyncio.create_task(dispatcher.run_forever(stop))
        deadline = started + cfg.b_cap_s
        capped = False
        while True:
            done = len(os.listdir(success)) + len(os.listdir(error))
            if done >= n:
                break
            if loop_task.done():
                raise RuntimeError(f"(b) the dispatcher loop ended: {done} of {n} cases done")
            if time.perf_counter() > deadline:
                capped = True  # a rate over part of the cases; the rest stay in outgoing/
                break
            await asyncio.sleep(0.02)
        ours_s = time.perf_counter() - started
        stop.set()
        await loop_task  # lets the cases in flight finish
    logging.getLogger("flows.sweep").removeFilter(race)
    failed = len(os.listdir(error))
    finished = len(os.listdir(success)) + failed
    ours = done / ours_s
    theirs = n / mercure_s
    ratio = ours / theirs
    say(
        f"(b) {n} cases x 5 CT 64x64 -> storescp (TCP_NODELAY=1, no --fork); "
        f"Prefect on PostgreSQL; limits {applied}"
    )
    say(
        f"    sequential dcmsend per case (mercure's model)   {theirs:7.1f} cases/s"
        f"  ({mercure_s:.1f} s)"
    )
    say(
        f"    Dispatcher, num_proc 8, scan 0.1 s              {ours:7.1f} cases/s  ({ours_s:.1f} s)"
        f"  {ratio:5.2f} x dcmsend{mark(ratio, TARGET_B, higher_is_better=True)}"
    )
    if capped:
        say(f"    (stopped after {cfg.b_cap_s:.0f} s, {done} of {n} cases done: rate over those)")
    if failed:
        say(f"    !! {failed} case(s) ended in error/")
    if race.count:
        say(
            f"    !! flows.sweep logged {race.count} x 'could not be moved to error/' for cases"
            " that had just reached success/ (a race in the scan; the cases are fine)"
        )
    out.put("b.scan_race_errors", race.count)
    say(
        f"    peak RSS during (b): {rss.peak / 2**20:.0f} MB"
        f"{mark(rss.peak / 2**20, TARGET_B_RSS_MB)}  (process lifetime max: {max_rss_mb():.0f} MB)"
    )
    say(
        f"    dispatcher scans: {len(scans)}, median {median(scans) * 1e3:.1f} ms, "
        f"max {max(scans, default=0) * 1e3:.1f} ms (each reads every task.json in outgoing/)"
    )
    say(f"    {cpu.line(finished)}")
    out.put("b.cpu_ms_per_case", cpu.per_case_ms(finished))
    out.put("b.api", print_trace(trace, finished, "per case"))
    out.put("b.capped_after_cases", done if capped else None)
    out.put("b.cases", n)
    out.put("b.dcmsend_loop.cases_per_s", round(theirs, 2))
    out.put("b.dispatcher.cases_per_s", round(ours, 2))
    out.put("b.ratio", round(ratio, 3))
    out.put("b.failed", failed)
    out.put("b.peak_rss_mb", round(rss.peak / 2**20, 1))
    out.put("b.scans", {"count": len(scans), "median_ms": round(median(scans) * 1e3, 2)})
