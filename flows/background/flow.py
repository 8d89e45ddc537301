"""The ``background_job`` flow: one job, ``func(*args, **kwargs)``, in its flow run's process.

Its deployment is never served by a Runner (a Runner would start runs without checking their
limits): the executor forks a process per admitted run and calls the flow object in it (see
``process.run_job_process``), so nothing pickles this module by value; the entrypoint below is
what the deployment records, and resolves through the package.
"""

from __future__ import annotations

import asyncio
import importlib
import traceback
from typing import Any

from prefect import flow, get_run_logger
from prefect.client.schemas.objects import State
from prefect.states import Failed

from flows.background._context import JobContext, enter_job

__all__ = [
    "DEPLOYMENT_NAME",
    "ENTRYPOINT",
    "FLOW_NAME",
    "JOB_TAG",
    "TYPE_TAG_PREFIX",
    "background_job",
    "resolve_func",
]

FLOW_NAME = "background_job"
DEPLOYMENT_NAME = "background-job"
ENTRYPOINT = "flows.background:background_job"
JOB_TAG = "background-job"
TYPE_TAG_PREFIX = "task-type:"


def resolve_func(ref: str) -> Any:
    """Import ``module:name`` (in the job's process)."""
    module_name, _, name = ref.partition(":")
    return getattr(importlib.import_module(module_name), name)


def _job_traceback(exc: BaseException) -> str:
    """The traceback from the job's function on (without this module's and asyncio's frames)."""
    import asyncio.threads
    import concurrent.futures.thread

    wrappers = {__file__, asyncio.threads.__file__, concurrent.futures.thread.__file__}
    tb = exc.__traceback__
    while tb is not None and tb.tb_frame.f_code.co_filename in wrappers:
        tb = tb.tb_next
    return "".join(traceback.format_exception(type(exc), exc, tb or exc.__traceback__))


@flow(name=FLOW_NAME, persist_result=False, validate_parameters=False)
async def background_job(
    func: str,
    args: list[Any] | None = None,
    kwargs: dict[str, Any] | None = None,
    task_type: str = "default",
    num_proc: int = 0,
    num_of_task_type: dict[str, int] | None = None,
    priority: int = 0,
) -> State[Any] | None:
    """One background job: ``func(*args, **kwargs)`` in this flow run's own process.

    ``task_type``, ``num_proc``, ``num_of_task_type`` and ``priority`` are read by the executor
    before the run starts. An exception ends the run Failed with its traceback;
    ``record_task_error_exit(msg)`` ends it Failed with ``msg``; ``sys.exit(n)`` with n != 0
    ends it Failed.
    """
    from prefect.runtime import flow_run as current_run

    logger = get_run_logger()
    job = JobContext(run_id=str(current_run.id), task_type=task_type)
    enter_job(job)
    try:
        function = resolve_func(func)
        await asyncio.to_thread(function, *(args or []), **(kwargs or {}))
    except SystemExit as exc:
        if exc.code not in (None, 0) and job.error is None:
            job.error = f"the job called sys.exit({exc.code!r})"
    except Exception as exc:  # noqa: BLE001 - the job's failure is its record's error
        job.error = _job_traceback(exc)
        logger.error("job %s failed:\n%s", job.run_id, job.error)
    if job.error is not None:
        return Failed(message=job.error)
    return None
