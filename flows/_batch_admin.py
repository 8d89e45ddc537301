"""A batch seen and steered through Prefect's API: its status, its progress artifact, and the
pause / resume / retry operations on its children.

A batch has no state of its own once its run has started the children: it is what its children
show, read by their ``batch:<id>`` tag. The CLI's ``batch`` command calls these functions; in the
UI the same children show as ``Paused`` (with Resume), ``Failed`` (with Retry), etc.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from uuid import UUID

from prefect import get_run_logger
from prefect.artifacts import aupdate_progress_artifact
from prefect.client.orchestration import PrefectClient, get_client
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterTags
from prefect.client.schemas.objects import Artifact, FlowRun, State, StateType
from prefect.client.schemas.sorting import FlowRunSort
from prefect.exceptions import ObjectNotFound
from prefect.states import AwaitingRetry, Completed, Failed, Paused, Scheduled

from blocks.errors import ConfigError, describe_error
from blocks.prefect_internals import api_post
from blocks.registry import aload_settings
from flows._batch import AGAIN, BATCH_TAG, next_offpeak_start, now, progress_key, set_state
from tasks import casefolder as cf
from tasks.paging import read_all
from tasks.retrieve import OUTGOING, accession_folder_name, parse_accessions
from tasks.safefiles import ensure_marker

LOGGER = logging.getLogger(__name__)
#: Runs that have not been picked up yet (a Pending run is already starting: it may finish).
_WAITING = (StateType.SCHEDULED,)


@dataclass
class BatchStatus:
    """A batch as its children show it."""

    batch_id: str
    state: str
    total: int
    counts: dict[str, int]
    children: list[dict[str, Any]]
    offpeak: bool
    destination: str
    message: str = ""

    @property
    def completed(self) -> int:
        return self.counts.get("Completed", 0)

    def as_dict(self) -> dict[str, Any]:
        return {
            "batch_id": self.batch_id,
            "state": self.state,
            "total": self.total,
            "completed": self.completed,
            "counts": self.counts,
            "offpeak": self.offpeak,
            "destination": self.destination,
            "message": self.message,
            "children": self.children,
        }


async def _children(client: PrefectClient, batch_id: str) -> list[FlowRun]:
    children = FlowRunFilter(tags=FlowRunFilterTags(all_=[f"{BATCH_TAG}{batch_id}"]))
    return await read_all(
        lambda size, offset: client.read_flow_runs(
            flow_run_filter=children,
            sort=FlowRunSort.EXPECTED_START_TIME_ASC,
            limit=size,
            offset=offset,
        )
    )


async def _read_batch(client: PrefectClient, batch_id: str) -> FlowRun:
    try:
        run = await client.read_flow_run(UUID(batch_id))
    except (ValueError, ObjectNotFound):
        raise ConfigError(f"no batch run {batch_id}") from None
    if run.parameters.get("accessions") is None:
        raise ConfigError(f"flow run {batch_id} is not a retrieve_batch run")
    return run


def _expected(parent: FlowRun) -> list[str]:
    return parse_accessions(parent.parameters.get("accessions") or [])


def _child_row(run: FlowRun) -> dict[str, Any]:
    return {
        "accession": str(run.parameters.get("accession", "")),
        "flow_run": str(run.id),
        "state": _state_name(run),
        "scheduled": run.expected_start_time.isoformat() if run.expected_start_time else None,
        "message": (run.state.message or "") if run.state else "",
    }


async def batch_status(batch_id: str, *, client: PrefectClient | None = None) -> BatchStatus:
    """Counts per state, one row per child, and the batch's overall state.

    The overall state: ``Failed`` (the check step failed), ``Completed`` (every accession
    retrieved), ``Failed`` (nothing left to run, some failed or were cancelled), ``Paused``
    (children paused, none running), ``Scheduled`` (waiting, e.g. for the off-peak window) or
    ``Running``. Also brings the batch's progress artifact up to date.
    """
    async with contextlib.nullcontext(client) if client is not None else get_client() as c:
        parent = await _read_batch(c, batch_id)
        runs = await _children(c, batch_id)
        expected = _expected(parent)
        rows = [_child_row(run) for run in runs]
        counts: dict[str, int] = {}
        for row in rows:
            counts[row["state"]] = counts.get(row["state"], 0) + 1
        parent_state = parent.state
        message = ""
        if not runs and parent_state is not None and parent_state.is_final():
            state = "Failed" if not parent_state.is_completed() else "Completed"
            message = parent_state.message or ""
        else:
            state = _overall(runs, len(expected))
        status = BatchStatus(
            batch_id=batch_id,
            state=state,
            total=len(expected),
            counts=counts,
            children=rows,
            offpeak=bool(parent.parameters.get("offpeak")),
            destination=str(parent.parameters.get("destination") or OUTGOING),
            message=message,
        )
        await _publish_progress(c, status)
    return status


def _state_name(run: FlowRun) -> str:
    state = run.state
    if state is None:
        return "Unknown"
    if state.type == StateType.PAUSED:
        return "Paused"
    return state.name or state.type.value.title()


def _overall(runs: Sequence[FlowRun], total: int) -> str:
    types = [r.state.type if r.state else StateType.SCHEDULED for r in runs]
    if runs and len(runs) >= total and all(t == StateType.COMPLETED for t in types):
        return "Completed"
    if any(t in (StateType.RUNNING, StateType.PENDING, StateType.CANCELLING) for t in types):
        return "Running"
    if any(t == StateType.SCHEDULED for t in types):
        return "Scheduled"
    if any(t == StateType.PAUSED for t in types):
        return "Paused"
    return "Failed"


async def _publish_progress(client: PrefectClient, status: BatchStatus) -> None:
    artifact = await latest_artifact(client, progress_key(status.batch_id))
    if artifact is None:
        return
    done = status.completed
    failed = sum(n for s, n in status.counts.items() if s in ("Failed", "Crashed", "Cancelled"))
    text = f"{done} of {status.total} accessions retrieved"
    if failed:
        text += f", {failed} failed"
    if status.counts.get("Paused"):
        text += f", {status.counts['Paused']} paused"
    percent = 100.0 * done / status.total if status.total else 100.0
    with contextlib.suppress(Exception):
        await aupdate_progress_artifact(
            artifact.id, percent, description=f"{text} ({status.state})", client=client
        )


async def latest_artifact(client: PrefectClient, key: str) -> Artifact | None:
    """The newest artifact with ``key``, or ``None``."""
    # PrefectClient.read_artifacts sends null for the filters it is not given, which the 3.8
    # server refuses (422): the request is written out here.
    body = {"artifacts": {"key": {"any_": [key]}}, "sort": "CREATED_DESC", "limit": 1}
    response = await api_post(client, "/artifacts/filter", body)
    response.raise_for_status()
    found = response.json()
    return Artifact.model_validate(found[0]) if found else None


async def after_child(batch_id: str, destination: str) -> None:
    """A child finished its work: update the batch's progress, and mark a whole folder job."""
    logger = get_run_logger()
    try:
        async with get_client() as client:
            parent = await _read_batch(client, batch_id)
            status = await batch_status(batch_id, client=client)
            if destination != OUTGOING:
                job_dir = Path(destination).expanduser() / batch_id
                here = {p.name for p in job_dir.iterdir() if p.is_dir()}
                if all(accession_folder_name(a) in here for a in _expected(parent)):
                    ensure_marker(job_dir / cf.COMPLETE)
                    logger.info("batch %s is complete: %s", batch_id, job_dir / cf.COMPLETE)
            logger.info("batch %s: %s", batch_id, json.dumps(status.counts))
    except Exception as exc:  # bookkeeping must not fail a retrieval that succeeded
        logger.warning("could not update batch %s: %s", batch_id, describe_error(exc))


def settled_state(runs: Sequence[FlowRun], expected: int) -> State[Any] | None:
    """The state a batch run should show once none of its children is left to run, else None.

    ``Completed`` when every accession was retrieved, else ``Failed`` naming what was not: a
    failed batch looks failed in the UI, and a ``batch retry`` that succeeds makes it Completed
    again.
    """
    if len(runs) < expected or any(r.state is None or not r.state.is_final() for r in runs):
        return None
    bad = [
        f"{r.parameters.get('accession', '')}: {r.state.name}: {r.state.message or ''}".rstrip(": ")
        for r in runs
        if r.state is not None and not r.state.is_completed()
    ]
    if bad:
        message = f"{len(bad)} of {len(runs)} retrievals failed: " + "; ".join(bad)
        return Failed(message=describe_error(message))
    return Completed(message=f"all {len(runs)} accessions retrieved")


async def settle_batch(batch_id: str) -> None:
    """Give a batch run the state its children add up to, once they all ended.

    Called when each child ends; while the batch run itself is still running it settles
    itself when it returns. Never fails the child that calls it.
    """
    try:
        async with get_client() as client:
            parent = await _read_batch(client, batch_id)
            if parent.state is None or not parent.state.is_final():
                return
            state = settled_state(await _children(client, batch_id), len(_expected(parent)))
            if state is None:
                return
            if parent.state.type == state.type and parent.state.message == state.message:
                return
            await client.set_flow_run_state(parent.id, state, force=True)
    except Exception as exc:  # bookkeeping must not fail a retrieval
        LOGGER.warning("could not settle batch %s: %s", batch_id, describe_error(exc))


async def children_of(client: PrefectClient, batch_id: str) -> list[FlowRun]:
    """Every child run of a batch (read by its ``batch:<id>`` tag)."""
    return await _children(client, batch_id)


async def _resume_time(parent: FlowRun) -> dt.datetime:
    at = now()
    if parent.parameters.get("offpeak"):
        settings = await aload_settings()
        return next_offpeak_start(settings.offpeak_start, settings.offpeak_end, at) or at
    return at


async def _move_children(
    client: PrefectClient,
    batch_id: str,
    runs: Sequence[FlowRun],
    states: Sequence[StateType],
    new_state: Callable[[], State[Any]],
) -> int:
    """Set every child in one of ``states`` to a ``new_state()``; how many were moved."""
    moved = 0
    for run in runs:
        if run.state is not None and run.state.type in states:
            await set_state(client, run.id, new_state())
            moved += 1
    await batch_status(batch_id, client=client)
    return moved


async def pause_batch(batch_id: str) -> int:
    """Children that have not started yet become ``Paused``; running ones finish. Returns how
    many were paused."""
    async with get_client() as client:
        await _read_batch(client, batch_id)
        runs = await _children(client, batch_id)
        return await _move_children(
            client,
            batch_id,
            runs,
            _WAITING,
            lambda: Paused(reschedule=True, message="batch paused"),
        )


async def resume_batch(batch_id: str) -> int:
    """Paused children are scheduled again (off-peak batches: into the window)."""
    async with get_client() as client:
        when = await _resume_time(await _read_batch(client, batch_id))
        runs = await _children(client, batch_id)
        return await _move_children(
            client,
            batch_id,
            runs,
            (StateType.PAUSED,),
            lambda: Scheduled(scheduled_time=when, name="Resumed"),
        )


async def retry_batch(batch_id: str) -> int:
    """Failed, crashed and cancelled children run again (off-peak batches: in the window).

    A batch whose check step failed has no children: it cannot be retried (submit it again
    once the accession list is right).
    """
    async with get_client() as client:
        parent = await _read_batch(client, batch_id)
        runs = await _children(client, batch_id)
        if not runs and parent.state is not None and parent.state.is_final():
            raise ConfigError(
                f"batch {batch_id} started no retrievals "
                f"({parent.state.message or parent.state.name}); submit it again"
            )
        when = await _resume_time(parent)
        return await _move_children(
            client, batch_id, runs, AGAIN, lambda: AwaitingRetry(scheduled_time=when)
        )
