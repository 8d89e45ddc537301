"""The job this process runs (one job per process), shared by the flow and the in-job helpers.

Kept out of the flow's module so that the flow's globals hold no mutable state: the flow sets
it, ``get_current_task`` and ``record_task_info`` read it, and neither imports the other.
"""

from __future__ import annotations

from dataclasses import dataclass
from uuid import UUID

__all__ = ["JobContext", "current_job", "enter_job"]


@dataclass
class JobContext:
    run_id: str
    task_type: str
    #: Set by ``record_task_error_exit`` (or a failure): the job will end Failed with it.
    error: str | None = None
    #: The job's info artifact, once ``record_task_info`` created it.
    info_artifact: UUID | None = None


_current: JobContext | None = None


def enter_job(job: JobContext) -> None:
    """This process now runs ``job`` (a job's process never runs another)."""
    global _current
    _current = job


def current_job() -> JobContext | None:
    """The job this process runs, or None outside a job."""
    return _current
