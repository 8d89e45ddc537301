"""A batch's run: the check step, one ``retrieve`` deployment run per accession, the window.

The batch run ends once its children are created (it does not hold a process while they wait);
each child is an ordinary ``retrieve`` run tagged ``batch:<batch run id>`` and
``acc:<accession>``, so it can be seen, cancelled and retried on its own, and their number at
once is the ``retrieve`` deployment's concurrency limit. With ``offpeak`` the children are
scheduled at the start of the off-peak window of ``DispatcherSettings``, and a child that would
start outside it (resumed by hand, window over) puts itself back to the next window start.

The ``retrieve_batch`` flow itself is declared in ``flows.query`` (its deployment entrypoint);
this module is its body and the conventions its children and :mod:`flows._batch_admin` share.
"""

from __future__ import annotations

import datetime as dt
import uuid
from pathlib import Path
from typing import Any
from uuid import UUID

from prefect import get_run_logger
from prefect.artifacts import (
    acreate_progress_artifact,
    acreate_table_artifact,
    aupdate_progress_artifact,
)
from prefect.client.orchestration import PrefectClient, get_client
from prefect.client.schemas.objects import State, StateType
from prefect.deployments import arun_deployment
from prefect.exceptions import Pause
from prefect.runtime import flow_run as current_run
from prefect.states import AwaitingRetry, Scheduled

from blocks.errors import ConfigError, QueryError
from blocks.qr import check_accession, normalize_filters
from blocks.registry import aload_settings, aload_target
from blocks.settings import DispatcherSettings
from tasks import casefolder as cf
from tasks.retrieve import OUTGOING, artifact_key, case_targets, check_accessions, parse_accessions

RETRIEVE_DEPLOYMENT = "retrieve/retrieve"
BATCH_TAG = "batch:"
OFFPEAK_TAG = "offpeak"
RETRIEVE_TAG = "dicom-dispatch-retrieve"
#: Children that ended without their files: a retry (or a rerun of the batch) runs them again.
AGAIN = (StateType.FAILED, StateType.CRASHED, StateType.CANCELLED)


def next_offpeak_start(start: str, end: str, now: dt.datetime) -> dt.datetime | None:
    """When the next off-peak window opens (local time), or ``None`` if it is open now.

    The window is mercure's (``tasks.casefolder.is_offpeak``): inclusive, across midnight when
    start >= end, always open when the times cannot be parsed.
    """
    if cf.is_offpeak(start, end, now.time()):
        return None
    begins = dt.datetime.strptime(start, "%H:%M").time()
    candidate = now.replace(hour=begins.hour, minute=begins.minute, second=0, microsecond=0)
    if candidate <= now:
        candidate += dt.timedelta(days=1)
    return candidate


def now() -> dt.datetime:
    return dt.datetime.now().astimezone()


def run_id() -> str:
    """This run's id (a job id), or a fresh one when the flow is called outside a run."""
    return str(current_run.id) if current_run.id else uuid.uuid4().hex


def batch_of_current_run() -> str | None:
    """The batch this run is a child of, from its ``batch:<id>`` tag."""
    for tag in current_run.tags or []:
        if str(tag).startswith(BATCH_TAG):
            return str(tag)[len(BATCH_TAG) :]
    return None


def progress_key(batch_id: str) -> str:
    """The key of a batch's progress artifact."""
    return artifact_key("batch", batch_id)


async def set_state(client: PrefectClient, run_id: UUID, state: State[Any]) -> None:
    await client.set_flow_run_state(run_id, state=state, force=True)


async def hold_for_offpeak(settings: DispatcherSettings) -> None:
    """Return when this run may retrieve now; an off-peak batch child that started outside the
    window (resumed from the UI, or the window closed while it waited) is put back to
    Scheduled at the next window start instead, and this process ends (:class:`Pause`)."""
    offpeak_child = batch_of_current_run() and OFFPEAK_TAG in (current_run.tags or [])
    if not offpeak_child or current_run.id is None:
        return
    later = next_offpeak_start(settings.offpeak_start, settings.offpeak_end, now())
    if later is None:
        return
    # A flow cannot return a non-final state, so the state is set here and the engine told
    # (Pause) to end the process without proposing a state of its own.
    get_run_logger().info("off-peak batch outside the window: rescheduled to %s", later)
    state: State[Any] = Scheduled(scheduled_time=later, message="waiting for the off-peak window")
    async with get_client() as client:
        await set_state(client, UUID(str(current_run.id)), state)
    raise Pause("rescheduled into the off-peak window", state=state)


def _child_tags(batch_id: str, accession: str, offpeak: bool) -> list[str]:
    tags = [RETRIEVE_TAG, f"{BATCH_TAG}{batch_id}", f"acc:{accession}"]
    return [*tags, OFFPEAK_TAG] if offpeak else tags


async def start_batch(
    target: str,
    accessions: list[str],
    filters: dict[str, Any] | None,
    destination: str,
    targets: list[str] | None,
    offpeak: bool,
) -> dict[str, Any]:
    """The body of ``retrieve_batch``: check everything, then create one child per accession."""
    logger = get_run_logger()
    settings = await aload_settings()
    batch_id = run_id()
    wanted = normalize_filters(filters)
    numbers = [check_accession(a) for a in parse_accessions(accessions)]
    if not numbers:
        raise QueryError("no accession numbers given")
    if destination == OUTGOING:
        for name in case_targets(targets):
            await aload_target(name)
    elif not Path(destination).expanduser().is_absolute():
        raise ConfigError(f"destination must be an absolute folder or {OUTGOING!r}")
    studies = await check_accessions(target, numbers, wanted)
    when = now()
    if offpeak:
        when = next_offpeak_start(settings.offpeak_start, settings.offpeak_end, when) or when
    if destination != OUTGOING:
        (Path(destination).expanduser() / batch_id).mkdir(parents=True, exist_ok=True)
    progress = await acreate_progress_artifact(
        0.0,
        key=progress_key(batch_id),
        description=f"0 of {len(numbers)} accessions retrieved",
    )
    children: dict[str, str] = {}
    async with get_client() as client:
        for accession in numbers:
            run = await arun_deployment(
                RETRIEVE_DEPLOYMENT,
                client=client,
                parameters={
                    "target": target,
                    "accession": accession,
                    "filters": wanted,
                    "destination": destination,
                    "targets": list(targets or []),
                },
                scheduled_time=when,
                flow_run_name=f"{accession} from {target}",
                timeout=0,
                tags=_child_tags(batch_id, accession, offpeak),
                idempotency_key=f"{batch_id}:{accession}",
                as_subflow=False,
            )
            children[accession] = str(run.id)
            if run.state is not None and run.state.type in AGAIN:  # this batch run is a rerun
                await set_state(client, run.id, AwaitingRetry(scheduled_time=when))
    logger.info(
        "batch %s: %d retrieval(s) from %s scheduled for %s", batch_id, len(children), target, when
    )
    await acreate_table_artifact(
        table=[
            {"accession": a, "studies": studies.get(a), "flow_run": r} for a, r in children.items()
        ],
        key=artifact_key("batch-runs", batch_id),
        description=f"retrieve runs of batch {batch_id}",
    )
    await aupdate_progress_artifact(
        progress, 0.0, description=f"0 of {len(numbers)} accessions retrieved"
    )
    return {
        "batch_id": batch_id,
        "children": children,
        "scheduled_for": when.isoformat(),
        "total": len(children),
    }
