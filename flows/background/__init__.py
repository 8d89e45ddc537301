"""OpenREM's background-job API on Prefect: every job is a flow run of ``background_job``.

The names and meanings are OpenREM's (``remapp.tools.background``); the machinery is not::

    run_in_background*()    a flow run of the ``background_job/background-job`` deployment,
                            created in the state Scheduled/"AwaitingConcurrencySlot"; returns
                            at once. The flow run id is the task id.
    a background executor   (``dicom-dispatch serve``, or ``python -m
                            deployments.background_service`` on more hosts) admits queued runs
                            whose limits allow it and starts each in its own process.
    limits                  checked at admission, against every active job of every host, under
                            a server-side lock (a global concurrency limit of 1); active jobs are
                            lease-backed counters on the Prefect server (one per task type plus
                            a total), so a killed job or host gives its slots back by itself.

A waiting job is only a Scheduled flow run: it holds no process and no slot, so a burst of one
type never delays another type that is under its limits (OpenREM's waiters held a worker each).

The rooms of this package::

    api.py        the public functions: queue, read, list, unqueue, terminate, wait
    in_job.py     the helpers for code inside a job (get_current_task, record_task_info ...)
    checks.py     what a request must be before it is queued (else JobRefusedError)
    records.py    BackgroundTask, QueuedTask, JobListing, JobLimits; a run -> its record
    queue.py      the server side: deployment, queue order, admission lock, counters
    executor.py   where a job is admitted (BackgroundExecutor.admit), started, watched, ended
    process.py    a job's process: forked from a fork server, killed by process group
    flow.py       the background_job flow itself

Import from here: the package names are the contract, the modules may move.
"""

from __future__ import annotations

from blocks.errors import (
    BackgroundJobError,
    JobNotFoundError,
    JobNotQueuedError,
    JobRefusedError,
)
from flows.background.api import (
    get_queued_tasks,
    get_task,
    list_tasks,
    remove_task_from_queue,
    run_in_background,
    run_in_background_with_limits,
    terminate_background,
    wait_task,
)
from flows.background.flow import ENTRYPOINT, JOB_TAG, background_job
from flows.background.in_job import (
    get_current_task,
    get_or_generate_task_uuid,
    record_task_error_exit,
    record_task_info,
)
from flows.background.queue import type_counter
from flows.background.records import (
    ACTIVE_STATES,
    AWAITING_SLOT,
    FORCEFULLY_ABORTED,
    REMOVED_FROM_QUEUE,
    BackgroundTask,
    JobListing,
    QueuedTask,
)

__all__ = [
    "ACTIVE_STATES",
    "AWAITING_SLOT",
    "ENTRYPOINT",
    "FORCEFULLY_ABORTED",
    "JOB_TAG",
    "REMOVED_FROM_QUEUE",
    "BackgroundJobError",
    "BackgroundTask",
    "JobListing",
    "JobNotFoundError",
    "JobNotQueuedError",
    "JobRefusedError",
    "QueuedTask",
    "background_job",
    "get_current_task",
    "get_or_generate_task_uuid",
    "get_queued_tasks",
    "get_task",
    "list_tasks",
    "record_task_error_exit",
    "record_task_info",
    "remove_task_from_queue",
    "run_in_background",
    "run_in_background_with_limits",
    "terminate_background",
    "type_counter",
    "wait_task",
]
