"""OpenREM's helpers for code that runs inside a job: who am I, say how far I got, fail.

Outside a job each does the harmless thing OpenREM's did (None, a fresh uuid, nothing), so a
function can be run as a job or called directly.
"""

from __future__ import annotations

import logging
import uuid
from uuid import UUID

from prefect.client.orchestration import get_client
from prefect.client.schemas.actions import ArtifactCreate, ArtifactUpdate

from flows.background._context import current_job
from flows.background.api import get_task
from flows.background.records import INFO_DESCRIPTION, BackgroundTask

__all__ = [
    "get_current_task",
    "get_or_generate_task_uuid",
    "record_task_error_exit",
    "record_task_info",
]

JOB_LOGGER = logging.getLogger(__name__)


def get_current_task() -> BackgroundTask | None:
    """The running job's record inside a job; None elsewhere, and after
    ``record_task_error_exit`` (as in OpenREM)."""
    job = current_job()
    if job is None or job.error is not None:
        return None
    return get_task(job.run_id)


def get_or_generate_task_uuid() -> str:
    """Inside a job its task id, else a new uuid4 string."""
    job = current_job()
    return job.run_id if job is not None else str(uuid.uuid4())


def record_task_info(info_msg: str) -> None:
    """Inside a job: show ``info_msg`` as the job's info (its run's artifact, and the log).

    The UI shows it at once (the run's Artifacts tab); ``get_task(...).info`` returns it.
    Does nothing outside a job.
    """
    job = current_job()
    if job is None:
        return
    text = str(info_msg)
    JOB_LOGGER.info("job %s: %s", job.run_id, text)
    with get_client(sync_client=True) as client:
        if job.info_artifact is None:
            artifact = client.create_artifact(
                ArtifactCreate(
                    type="markdown",
                    data=text,
                    description=INFO_DESCRIPTION,
                    flow_run_id=UUID(job.run_id),
                )
            )
            job.info_artifact = artifact.id
        else:
            client.update_artifact(job.info_artifact, ArtifactUpdate(data=text))


def record_task_error_exit(error_msg: str) -> None:
    """Inside a job: the job will end Failed with ``error_msg`` (when it really ends, which is
    also when its slots are released). ``get_current_task()`` returns None from now on."""
    job = current_job()
    if job is None:
        return
    job.error = str(error_msg)
    JOB_LOGGER.error("job %s: %s", job.run_id, job.error)
