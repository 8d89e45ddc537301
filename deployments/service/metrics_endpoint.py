"""The service's Prometheus endpoint, and what it samples from Prefect every few seconds.

One endpoint per host, unauthenticated, so on loopback unless ``blocks.host`` says otherwise.
It reads prometheus-client's multiprocess directory (``<data dir>/metrics``), so one scrape shows
every dispatcher process of the host; ``prepare_metrics_dir`` empties it when the service starts
(files of processes that are gone would otherwise be counted forever). The queue depth is
counted from the folders at scrape time; background jobs per state and the limits in use come
from Prefect's API, sampled by ``sample_forever`` with the heartbeat.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.multiprocess import MultiProcessCollector, mark_process_dead
from prometheus_client.registry import Collector

from flows.metrics import (
    record_background_jobs,
    record_heartbeat,
    record_limits,
    use_multiprocess_dir,
)
from tasks.casefolder import scan_outgoing
from tasks.periodic import Periodic
from tasks.tags import TOTAL_TAG

if TYPE_CHECKING:
    from blocks.settings import DispatcherSettings

__all__ = ["MetricsEndpoint", "prepare_metrics_dir", "sample_forever"]

LOGGER = logging.getLogger(__name__)
SAMPLE_SECONDS = 10.0
METRICS_DIR = "metrics"


def prepare_metrics_dir(home: Path) -> Path:
    """Empty ``<home>/metrics`` and use it; once per service start, before any worker starts."""
    directory = home / METRICS_DIR
    directory.mkdir(parents=True, exist_ok=True)
    for stale in directory.glob("*.db"):
        with contextlib.suppress(FileNotFoundError):
            stale.unlink()
    use_multiprocess_dir(directory)
    return directory


class QueueDepth(Collector):
    """Case folders in outgoing/, success/ and error/, counted when scraped; ``invalid``: the
    entries of outgoing/ that are not cases to dispatch (a bad task.json, a folder the service
    cannot read or write, a planted claim marker)."""

    def __init__(self, settings: Callable[[], DispatcherSettings]) -> None:
        self._settings = settings

    def collect(self) -> Iterator[GaugeMetricFamily]:
        family = GaugeMetricFamily(
            "dicom_dispatch_queue_depth", "Case folders in each folder now.", labels=["folder"]
        )
        settings = self._settings()
        outgoing, success, error = settings.folders()
        for name, folder in (("outgoing", outgoing), ("success", success), ("error", error)):
            family.add_metric([name], _count_cases(folder))
        family.add_metric(["invalid"], _count_invalid(settings))
        yield family


def _count_cases(folder: Path) -> int:
    try:
        with os.scandir(folder) as entries:
            return sum(
                1 for e in entries if not e.name.startswith(".") and e.is_dir(follow_symlinks=False)
            )
    except OSError:
        return 0


def _count_invalid(settings: DispatcherSettings) -> int:
    """Entries of outgoing/ that are not cases to dispatch (``status``'s ``invalid``)."""
    scan = scan_outgoing(
        settings.folders()[0], rule_priorities=settings.rule_priorities, invalid_grace=math.inf
    )
    return len(scan.problems())


class MetricsEndpoint:
    """The HTTP endpoint; a port taken by another process is logged, not fatal."""

    def __init__(self, settings: Callable[[], DispatcherSettings]) -> None:
        self.registry = CollectorRegistry()
        if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
            MultiProcessCollector(self.registry)  # type: ignore[no-untyped-call]
        else:
            from prometheus_client import REGISTRY

            self.registry = REGISTRY
        self.registry.register(QueueDepth(settings))
        self._server: Any = None

    def start(self, address: str, port: int) -> bool:
        try:
            self._server, _thread = start_http_server(port, addr=address, registry=self.registry)
        except OSError as exc:
            LOGGER.warning("metrics not served on %s:%d: %s", address, port, exc)
            return False
        LOGGER.info("metrics on http://%s:%d/metrics", address, port)
        return True

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None


async def sample_forever(stop: asyncio.Event) -> None:
    """Heartbeat, background jobs per state and limits in use, every ``SAMPLE_SECONDS``."""

    async def step() -> None:
        record_heartbeat()  # first: the API away for a moment must not stop the heartbeat
        await _sample_prefect()

    sampler = Periodic(
        "metrics sampler",
        step,
        SAMPLE_SECONDS,
        wait_first=False,
        error_level=logging.WARNING,
        logger=LOGGER,
    )
    try:
        await sampler.run(stop)
    finally:
        if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
            # This process's live gauges leave the sums.
            mark_process_dead(os.getpid())  # type: ignore[no-untyped-call]


async def _sample_prefect() -> None:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (
        FlowFilter,
        FlowFilterName,
        FlowRunFilter,
        FlowRunFilterState,
        FlowRunFilterStateType,
    )
    from prefect.client.schemas.objects import StateType

    from flows.background.flow import FLOW_NAME

    async with get_client() as client:
        jobs = FlowFilter(name=FlowFilterName(any_=[FLOW_NAME]))
        counts = {}
        for state in StateType:
            runs = FlowRunFilter(
                state=FlowRunFilterState(type=FlowRunFilterStateType(any_=[state]))
            )
            counts[state.value] = await client.count_flow_runs(
                flow_filter=jobs, flow_run_filter=runs
            )
        limits = await client.read_concurrency_limits(limit=200, offset=0)
    record_background_jobs(counts)
    record_limits(
        {
            lim.tag: (lim.concurrency_limit, len(lim.active_slots or []))
            for lim in limits
            if lim.tag == TOTAL_TAG or lim.tag.startswith(("target-type:", "target:"))
        }
    )
