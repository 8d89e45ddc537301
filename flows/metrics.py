"""Prometheus instrumentation points: plain functions the flows and the service call.

The metric objects are made on first use, after the service chose prometheus-client's
multiprocess mode (``use_multiprocess_dir``): then every process of the host (``--workers``)
writes its values to files in one directory and one scrape sums them up. Without it (a CLI
command, a test) the values live in this process's registry and go with it. The queue depth is
not recorded here: the endpoint counts the folders when it is scraped
(``deployments/service/metrics_endpoint``).
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from prometheus_client import Counter, Gauge, Histogram, values

from tasks.taskjson import TaskFileError, read_task_raw

if TYPE_CHECKING:
    from flows.dispatch import CaseOutcome

__all__ = [
    "MULTIPROC_ENV",
    "case_ready_at",
    "record_background_jobs",
    "record_case_outcome",
    "record_heartbeat",
    "record_limits",
    "use_multiprocess_dir",
]

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
#: Ready → success: seconds to hours (a retried case waits ``retry_delay`` per attempt).
READY_BUCKETS = (1, 2, 5, 10, 30, 60, 300, 900, 1800, 3600, 4 * 3600, 12 * 3600, 86400)
#: Per target: what an attempt did for it.
SENT, RETRIED, FAILED = "dispatched", "retried", "failed"


@dataclass
class _Metrics:
    attempts: Counter
    target_cases: Counter
    sent_bytes: Counter
    sent_files: Counter
    commitment: Counter
    ready_to_success: Histogram
    heartbeat: Gauge
    processes: Gauge
    jobs: Gauge
    limit: Gauge
    limit_in_use: Gauge


_metrics: _Metrics | None = None


def use_multiprocess_dir(directory: Path) -> None:
    """Write this process's metrics (and its children's: the variable is inherited) there.

    Must come before the first instrumentation call; prometheus-client picks its value store
    from the variable, which it read when it was imported (Prefect imports it early).
    """
    directory.mkdir(parents=True, exist_ok=True)
    os.environ[MULTIPROC_ENV] = str(directory)
    if _metrics is None:
        values.ValueClass = values.get_value_class()  # type: ignore[no-untyped-call]


def _get() -> _Metrics:
    global _metrics
    if _metrics is None:
        _metrics = _Metrics(
            attempts=Counter(
                "dicom_dispatch_case_attempts",
                "Attempts at a case, by where they left it (success, outgoing, error).",
                ["location"],
            ),
            target_cases=Counter(
                "dicom_dispatch_target_cases",
                "Cases per target: dispatched, retried (send failed, case back in the queue), "
                "failed (case went to error/).",
                ["target", "outcome"],
            ),
            sent_bytes=Counter("dicom_dispatch_sent_bytes", "Bytes sent per target.", ["target"]),
            sent_files=Counter(
                "dicom_dispatch_sent_files",
                "Files sent per target (the DICOM instances, for a DICOM target).",
                ["target"],
            ),
            commitment=Counter(
                "dicom_dispatch_storage_commitment_cases",
                "Attempts per target with Storage Commitment, by its outcome: committed (every "
                "instance), failed (some refused), pending (no answer yet or within the timeout).",
                ["target", "outcome"],
            ),
            ready_to_success=Histogram(
                "dicom_dispatch_ready_to_success_seconds",
                "From a case being ready (task.json written, retry due) to success/.",
                buckets=READY_BUCKETS,
            ),
            heartbeat=Gauge(
                "dicom_dispatch_heartbeat_timestamp_seconds",
                "Unix time of the newest heartbeat of any service process.",
                multiprocess_mode="livemax",
            ),
            processes=Gauge(
                "dicom_dispatch_processes",
                "Service processes alive on this host.",
                multiprocess_mode="livesum",
            ),
            jobs=Gauge(
                "dicom_dispatch_background_jobs",
                "Background jobs by Prefect state type.",
                ["state"],
                multiprocess_mode="mostrecent",
            ),
            limit=Gauge(
                "dicom_dispatch_limit",
                "Prefect tag concurrency limits the service set.",
                ["tag"],
                multiprocess_mode="mostrecent",
            ),
            limit_in_use=Gauge(
                "dicom_dispatch_limit_in_use",
                "Slots of each tag concurrency limit held now.",
                ["tag"],
                multiprocess_mode="mostrecent",
            ),
        )
        _metrics.processes.set(1)
    return _metrics


def case_ready_at(case_dir: Path) -> float | None:
    """When the case became ready for this attempt: task.json's last write, or its retry time."""
    try:
        ready = (case_dir / "task.json").stat().st_mtime
    except OSError:
        return None
    try:
        dispatch = read_task_raw(case_dir).get("dispatch")
    except (TaskFileError, OSError):
        dispatch = None
    due = dispatch.get("next_retry_at") if isinstance(dispatch, dict) else None
    return max(ready, float(due)) if isinstance(due, int | float) else ready


def record_case_outcome(outcome: CaseOutcome, ready_at: float | None = None) -> None:
    """One finished attempt: per case, per target, bytes and instances, and ready → success."""
    m = _get()
    m.attempts.labels(outcome.location).inc()
    for target, result in outcome.targets.items():
        if result.get("state") == "complete":
            m.target_cases.labels(target, SENT).inc()
            m.sent_bytes.labels(target).inc(_number(result.get("bytes")))
            m.sent_files.labels(target).inc(_number(result.get("files")))
        else:
            m.target_cases.labels(
                target, RETRIED if outcome.location == "outgoing" else FAILED
            ).inc()
    for target, counts in _commitment_counts(outcome).items():
        m.commitment.labels(target, commitment_outcome(counts)).inc()
    if outcome.location == "success" and ready_at is not None:
        m.ready_to_success.observe(max(0.0, time.time() - ready_at))


def commitment_outcome(counts: dict[str, Any]) -> str:
    """``committed``, ``failed`` or ``pending``: a target's ``storage_commitment`` counts."""
    if counts.get("failed"):
        return "failed"
    if counts.get("committed", 0) >= counts.get("instances", 0):
        return "committed"
    return "pending"


def _commitment_counts(outcome: CaseOutcome) -> dict[str, dict[str, Any]]:
    """``status[target].storage_commitment`` of the targets this attempt sent to, as the case's
    task.json (wherever the attempt left it) records them."""
    if not outcome.targets or not outcome.path:
        return {}
    try:
        status = read_task_raw(Path(outcome.path)).get("dispatch", {}).get("status", {})
    except (TaskFileError, OSError, AttributeError):
        return {}
    found: dict[str, dict[str, Any]] = {}
    for target in outcome.targets:
        entry = status.get(target) if isinstance(status, dict) else None
        counts = entry.get("storage_commitment") if isinstance(entry, dict) else None
        if isinstance(counts, dict):
            found[target] = counts
    return found


def record_heartbeat() -> None:
    _get().heartbeat.set(time.time())


def record_background_jobs(counts: dict[str, int]) -> None:
    """Jobs per Prefect state type (SCHEDULED, RUNNING, COMPLETED, ...)."""
    gauge = _get().jobs
    for state, count in counts.items():
        gauge.labels(state).set(count)


def record_limits(limits: dict[str, tuple[int, int]]) -> None:
    """``tag → (limit, slots in use)`` for every tag limit the service manages."""
    m = _get()
    for tag, (limit, in_use) in limits.items():
        m.limit.labels(tag).set(limit)
        m.limit_in_use.labels(tag).set(in_use)


def _number(value: Any) -> float:
    return float(value) if isinstance(value, int | float) and value > 0 else 0.0
