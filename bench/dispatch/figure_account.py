"""Figure (f) of the service benchmark: where one small case's time and CPU go.

Small cases (5 CT 64×64 to ``storescp``) are dropped into the running ``serve`` one at a time;
then empty async flow runs (``persist_result=False``) go from this process to the same server.
Each is a window, measured the same way from outside the service:

* API requests by route, from the server's access log (``access_log.py``): every process's;
* events by name, from the server's events table (``events_table.py``);
* CPU seconds of every process group (``service_cpu.py``), this process as the empty runs'
  client.

A window of the same service doing nothing comes first: its rates (the Runner's polls, the
settings refresh, the periodic services, the server's loop services) are subtracted from the
"net" columns, since a window's length is partly the benchmark's own pauses.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

from bench._common import percentile, say
from bench.dispatch.access_log import AccessLog
from bench.dispatch.dcmsend import run_dcmsend
from bench.dispatch.events_table import events_in
from bench.dispatch.prefect_setup import drain_prefect_workers
from bench.dispatch.report import Report
from bench.dispatch.service import PACS, Service, one_at_a_time
from bench.dispatch.service_cpu import (
    CLIENT,
    GROUPS,
    POSTGRES,
    SERVER,
    cpu_snapshot,
    cpu_used,
)
from bench.dispatch.service_figures import mercure_copies, service_api, staged_cases

#: Prefect's clients send run logs in batches every 2 s (PREFECT_LOGGING_TO_API_BATCH_INTERVAL).
LOG_BATCH_S = 2.5


@dataclass
class Window:
    """One measured stretch: its clock edges, access-log edges and CPU used per group."""

    log_start: int = 0
    log_end: int = 0
    start: float = 0.0
    end: float = 0.0
    cpu: dict[str, float] = field(default_factory=dict)
    requests: Counter[str] = field(default_factory=Counter)
    events: Counter[str] = field(default_factory=Counter)

    @property
    def seconds(self) -> float:
        return self.end - self.start


@contextmanager
def window(service: Service, log: AccessLog, client: bool = False) -> Iterator[Window]:
    """Measure the ``with`` block; requests and events are read later (``read_windows``)."""
    win = Window(log_start=log.mark())
    before = cpu_snapshot(service, client)
    win.start = time.time()
    yield win
    win.end = time.time()
    win.cpu = cpu_used(before, cpu_snapshot(service, client))
    win.log_end = log.mark()


def read_windows(service: Service, log: AccessLog, windows: list[Window]) -> None:
    """Fill in each window's requests and events (waits for the event persister's flush)."""
    for win in windows:
        win.requests = log.between(win.log_start, win.log_end)
    counts = events_in(service.home / "postgres", [(w.start, w.end) for w in windows])
    for win, events in zip(windows, counts, strict=True):
        win.events = events


async def _empty_walls(service: Service, runs: int) -> list[float]:
    from prefect import flow

    @flow(name="bench_empty", persist_result=False)
    async def bench_empty() -> None:
        return None

    walls = []
    with service_api(service):
        for _ in range(runs):
            began = time.perf_counter()
            await bench_empty()
            walls.append(time.perf_counter() - began)
    return walls


def empty_flow_walls(service: Service, runs: int) -> list[float]:
    """Wall seconds of empty async flow runs from this process, one after the other."""
    return asyncio.run(_empty_walls(service, runs))


@dataclass
class PerUnit:
    """A window's figures per case (or per empty run), gross and net of the idle rates."""

    win: Window
    units: int
    idle: Window

    def cpu_ms(self, group: str, net: bool) -> float:
        used = self.win.cpu.get(group, 0.0)
        if net and group != CLIENT:
            used -= self.idle.cpu.get(group, 0.0) / self.idle.seconds * self.win.seconds
        return used / self.units * 1e3

    def total_ms(self, groups: tuple[str, ...], net: bool) -> float:
        return sum(self.cpu_ms(g, net) for g in groups)


def _count_row(case: PerUnit, empty: PerUnit, counts: tuple[int, int, int]) -> list[float]:
    """Per case and net, per empty run and net, and the idle rate per 10 s, of one count."""
    ours, theirs, quiet = counts
    rate = quiet / case.idle.seconds
    return [
        ours / case.units,
        (ours - rate * case.win.seconds) / case.units,
        theirs / empty.units,
        (theirs - rate * empty.win.seconds) / empty.units,
        rate * 10,
    ]


def _print_counts(title: str, case: PerUnit, empty: PerUnit, kind: str) -> dict[str, list[float]]:
    """A table of requests (``kind`` "requests") or events per route or name."""
    ours, theirs, quiet = (
        (case.win.requests, empty.win.requests, case.idle.requests)
        if kind == "requests"
        else (case.win.events, empty.win.events, case.idle.events)
    )
    keys = sorted(set(ours) | set(theirs) | set(quiet), key=lambda k: (-ours[k], -theirs[k], k))
    say(f"    {title:<60} {'case':>6} {'net':>6} {'empty':>6} {'net':>6} {'idle/10s':>8}")
    rows: dict[str, list[float]] = {}
    for key in [*keys, "total"]:
        if key == "total":
            counts = (sum(ours.values()), sum(theirs.values()), sum(quiet.values()))
        else:
            counts = (ours[key], theirs[key], quiet[key])
        row = _count_row(case, empty, counts)
        rows[key] = [round(v, 2) for v in row]
        say(
            f"      {key:<58} {row[0]:6.2f} {row[1]:6.2f} {row[2]:6.2f} {row[3]:6.2f} {row[4]:8.2f}"
        )
    return rows


def _print_cpu(case: PerUnit, empty: PerUnit, idle: Window) -> dict[str, list[float]]:
    say(
        f"    {'CPU ms per case / per empty flow run':<40} {'case':>7} {'net':>7}"
        f" {'empty':>7} {'net':>7} {'idle ms/s':>9}"
    )
    rows: dict[str, list[float]] = {}
    for group in (*GROUPS, CLIENT):
        row = [
            case.cpu_ms(group, False),
            case.cpu_ms(group, True),
            empty.cpu_ms(group, False),
            empty.cpu_ms(group, True),
            idle.cpu.get(group, 0.0) / idle.seconds * 1e3,
        ]
        rows[group] = [round(v, 1) for v in row]
        say(
            f"      {group:<38} {row[0]:7.1f} {row[1]:7.1f} {row[2]:7.1f} {row[3]:7.1f}"
            f" {row[4]:9.1f}"
        )
    service, flow_side = GROUPS, (SERVER, POSTGRES, CLIENT)
    totals = [
        case.total_ms(service, False),
        case.total_ms(service, True),
        empty.total_ms(flow_side, False),
        empty.total_ms(flow_side, True),
    ]
    rows["total"] = [round(v, 1) for v in totals]
    say(
        f"      {'total (empty: server + PG + client)':<38}"
        f" {totals[0]:7.1f} {totals[1]:7.1f} {totals[2]:7.1f} {totals[3]:7.1f}"
    )
    return rows


def figure_f(
    service: Service, out: Report, binary: str, port: int, cases: int, idle_s: float
) -> None:
    """One small case at a time through ``serve``: requests, events, CPU; an empty flow run's
    the same; ready → success beside the empty run's wall and ``dcmsend`` alone."""
    log = AccessLog(service.home / "logs" / "prefect-server.log")
    staged = staged_cases(service, cases + 2, PACS, files=5, rows=64, cols=64)
    copies = mercure_copies(staged[2:], service.staging.parent / "f-dcmsend")
    one_at_a_time(service, staged[:2])  # warm-up: the target's block, the first runs
    empty_flow_walls(service, 2)
    with window(service, log) as idle:
        time.sleep(idle_s)
    with window(service, log) as busy:
        walls = one_at_a_time(service, staged[2:])
        time.sleep(LOG_BATCH_S)  # the last case's batched run logs land inside the window
    with window(service, log, client=True) as quiet:
        empties = empty_flow_walls(service, cases)
        drain_prefect_workers()  # this process's queued logs and events, sent now
    sends = [run_dcmsend(binary, c, port, c / "sent.txt") for c in copies]
    read_windows(service, log, [idle, busy, quiet])
    case, empty = PerUnit(busy, cases, idle), PerUnit(quiet, cases, idle)

    say(
        f"(f) small cases (5 CT 64x64 -> storescp) one at a time through serve, {cases} cases;"
        f" {cases} empty async flow runs from this process to the same server"
    )
    say(f"    idle window {idle.seconds:.0f} s before; 'net' = minus the idle rates")
    timing = {
        "ready -> success/ (serve)": walls,
        "empty async flow run (wall)": empties,
        "dcmsend alone, mercure's command, TCP_NODELAY=1": sends,
    }
    for label, values in timing.items():
        p50, p95 = percentile(values, 0.5), percentile(values, 0.95)
        say(f"    {label:<50} p50 {p50 * 1e3:6.0f} ms  p95 {p95 * 1e3:6.0f} ms")
    out.put("f.ready_to_success_s", _p(walls))
    out.put("f.empty_flow_s", _p(empties))
    out.put("f.dcmsend_s", _p(sends))
    if not sum(busy.requests.values()):
        say("    !! the server's access log has no request in the window: requests not counted")
    out.put(
        "f.requests",
        _print_counts("API requests by route (server access log)", case, empty, "requests"),
    )
    out.put(
        "f.events",
        _print_counts("events by name (stored in the events table)", case, empty, "events"),
    )
    cpu = _print_cpu(case, empty, idle)
    out.put("f.cpu_ms", cpu)
    gross, net = cpu["total"][0] / cpu["total"][2], cpu["total"][1] / cpu["total"][3]
    say(f"    service CPU per case ÷ empty flow run CPU: {gross:.2f} gross, {net:.2f} net")
    out.put("f.cpu_ratio_vs_empty", {"gross": round(gross, 2), "net": round(net, 2)})


def _p(values: list[float]) -> dict[str, float]:
    return {"p50": round(percentile(values, 0.5), 4), "p95": round(percentile(values, 0.95), 4)}
