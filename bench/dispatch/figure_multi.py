"""Figure (h) of the service benchmark: ``serve`` defaults beside ``--api-processes 2 --workers 2``.

The same small cases (5 CT 64×64 each) are dropped at once into each service in turn, each with
a receiver of its own that keeps every file it is sent (``storescp --unique-filenames``), so an
instance sent twice is two files. Per service: wall time; duplicates and missing instances at
the receiver; the most send task runs that were Running at once under each tag limit (from the
task runs' own start and end times, read back from the API), beside the limit; CPU per case by
process kind, which is README's capacity table.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from pathlib import Path
from typing import Any

from bench._common import max_overlap, say
from bench.dispatch.config import SCP_AET
from bench.dispatch.report import Report
from bench.dispatch.service import PACS, Service, running_service
from bench.dispatch.service_cpu import cpu_snapshot, cpu_used
from bench.dispatch.service_figures import drop_at_once, service_api, staged_cases

#: The embedded server writes task runs in batches at least every second (server_tuning.py).
TASK_RUNS_WRITTEN_S = 2.0
#: (label, serve's arguments)
SETUPS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("serve (defaults)", ()),
    ("serve --api-processes 2 --workers 2", ("--api-processes", "2", "--workers", "2")),
)


def received(folder: Path) -> Counter[str]:
    """SOP instance UIDs of the files the receiver wrote, with how often each came."""
    import pydicom

    uids: Counter[str] = Counter()
    for path in folder.rglob("*"):
        if path.is_file():
            ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=["SOPInstanceUID"])
            uids[str(ds.SOPInstanceUID)] += 1
    return uids


def sent_uids(cases: list[Path]) -> set[str]:
    import pydicom

    return {
        str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID)
        for case in cases
        for p in case.glob("*.dcm")
    }


async def _limits_held(service: Service) -> dict[str, tuple[int, int]]:
    """Per limited tag: (most send task runs Running at once, the limit)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import TaskRunFilter, TaskRunFilterName
    from prefect.client.schemas.sorting import TaskRunSort

    from tasks.paging import read_all

    with service_api(service):
        async with get_client() as client:
            limits = {
                lim.name.removeprefix("tag:"): lim.limit
                for lim in await client.read_global_concurrency_limits(limit=200)
                if lim.name.startswith("tag:")
            }
            wanted = TaskRunFilter(name=TaskRunFilterName(like_="send-"))

            async def page(limit: int, offset: int) -> list[Any]:
                return list(
                    await client.read_task_runs(
                        task_run_filter=wanted, sort=TaskRunSort.ID_DESC, offset=offset, limit=limit
                    )
                )

            runs = await read_all(page)
    spans: dict[str, list[tuple[float, float]]] = {tag: [] for tag in limits}
    for run in runs:
        if run.start_time is None or run.end_time is None:
            continue
        for tag in run.tags:
            if tag in spans:
                spans[tag].append((run.start_time.timestamp(), run.end_time.timestamp()))
    return {tag: (max_overlap(spans[tag]), limits[tag]) for tag in limits if spans[tag]}


def figure_h(work: Path, out: Report, cases: int) -> None:
    from tests.peers.dcmtk import StoreSCP

    say(f"(h) {cases} x 5 CT 64x64 dropped at once, each setup with its own storescp -uf")
    for number, (label, args) in enumerate(SETUPS):
        base = work / f"h{number}"
        folder = base / "scp"
        folder.mkdir(parents=True)
        with (
            StoreSCP(folder, aet=SCP_AET, nodelay=True, extra_args=["--unique-filenames"]) as scp,
            running_service(base / "service", scp.port, serve_args=args) as service,
        ):
            staged = staged_cases(service, cases, PACS, files=5, rows=64, cols=64)
            expected = sent_uids(staged)
            before = cpu_snapshot(service)
            seconds = drop_at_once(service, staged, 1800)
            cpu = cpu_used(before, cpu_snapshot(service))
            time.sleep(TASK_RUNS_WRITTEN_S)
            limits = asyncio.run(_limits_held(service))
        got = received(folder)
        duplicates = sum(n - 1 for n in got.values())
        missing = len(expected - set(got))
        held = all(most <= limit for most, limit in limits.values())
        say(f"    {label:<40} {seconds:7.1f} s  {cases / seconds:5.1f} cases/s")
        say(
            f"      duplicates {duplicates}, missing {missing}; limits "
            + ", ".join(f"{tag} {most}/{limit}" for tag, (most, limit) in sorted(limits.items()))
            + ("  (held)" if held else "  (NOT held)")
        )
        total = sum(cpu.values())
        say(
            "      CPU ms per case: "
            + ", ".join(f"{kind} {used / cases * 1e3:.0f}" for kind, used in cpu.items() if used)
            + f"; total {total / cases * 1e3:.0f}"
        )
        key = f"h.{'multi' if args else 'default'}"
        out.put(f"{key}.s", round(seconds, 2))
        out.put(f"{key}.duplicates", duplicates)
        out.put(f"{key}.missing", missing)
        out.put(f"{key}.limits", {tag: list(v) for tag, v in limits.items()})
        out.put(f"{key}.cpu_ms_per_case", {k: round(v / cases * 1e3, 1) for k, v in cpu.items()})
