"""Query and retrieve: ``query``, ``retrieve`` and ``retrieve_batch`` (architecture §4.3).

* ``query``: the target block's ``find`` (C-FIND or QIDO-RS) by accession number and filters;
  the rows are returned and published as a table artifact.
* ``retrieve``: one accession into a folder (``<destination>/<job id>/<accession>/…``, then
  ``.complete`` when the job is whole) or into the outgoing queue (``destination="outgoing"``:
  a new case with a valid ``task.json`` naming ``targets``, so the dispatcher sends it). Files
  arrive in a hidden staging folder and appear under their final name in one rename; a progress
  artifact shows received / expected instances as they arrive.
* ``retrieve_batch``: a check step that fails fast on accession numbers the node does not know,
  then one independent run of the ``retrieve`` deployment per accession (each can be seen,
  cancelled and retried on its own; their number at once is the deployment's concurrency
  limit). Children carry the tags ``batch:<batch run id>`` and ``acc:<accession>``. The batch
  run ends once its children are created (it does not hold a process while they wait); each
  child updates the batch's progress artifact when it ends, and the last one of a folder
  destination writes ``.complete``. With ``offpeak`` the children are scheduled at the start
  of the off-peak window of ``DispatcherSettings``; one that would start outside it (resumed by
  hand, window over) puts itself back to the next window start.

This module declares the three flows (their names, run names and the entrypoints
``flows/query.py:<flow>`` of the deployments) and is the public import place of the query
vocabulary. The work is elsewhere: the retrieve steps and tasks in :mod:`tasks.retrieve`, a
batch's run in :mod:`flows._batch`, the batch operations (:func:`pause_batch`,
:func:`resume_batch`, :func:`retry_batch`, :func:`batch_status`; the CLI's ``batch`` command) in
:mod:`flows._batch_admin`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import anyio
from prefect import flow, get_run_logger
from prefect.artifacts import acreate_markdown_artifact, acreate_table_artifact
from prefect.client.orchestration import get_client
from prefect.client.schemas.objects import FlowRun, State
from prefect.runtime import flow_run as current_run

from blocks.errors import ConfigError
from blocks.qr import Level, QueryError, check_accession, normalize_filters
from blocks.registry import aload_settings
from flows._batch import (
    BATCH_TAG,
    RETRIEVE_DEPLOYMENT,
    RETRIEVE_TAG,
    batch_of_current_run,
    hold_for_offpeak,
    next_offpeak_start,
    run_id,
    start_batch,
)
from flows._batch_admin import (
    BatchStatus,
    after_child,
    batch_status,
    children_of,
    latest_artifact,
    pause_batch,
    resume_batch,
    retry_batch,
    settle_batch,
    settled_state,
)
from tasks.retrieve import (
    OUTGOING,
    PROGRESS_LISTENERS,
    Retrieval,
    accession_folder_name,
    aload_source,
    artifact_key,
    parse_accessions,
    retrieve_to_folder,
    retrieve_to_outgoing,
)

__all__ = [
    "BATCH_TAG",
    "OUTGOING",
    "PROGRESS_LISTENERS",
    "RETRIEVE_DEPLOYMENT",
    "RETRIEVE_TAG",
    "BatchStatus",
    "accession_folder_name",
    "batch_status",
    "latest_artifact",
    "next_offpeak_start",
    "parse_accessions",
    "pause_batch",
    "query",
    "resume_batch",
    "retrieve",
    "retrieve_batch",
    "retry_batch",
]


def _query_run_name() -> str:
    params = current_run.parameters
    return f"{params.get('accession', '')} on {params.get('target', '')}".strip()


@flow(name="query", flow_run_name=_query_run_name, persist_result=False)
async def query(
    target: str,
    accession: str,
    filters: dict[str, Any] | None = None,
    level: str = "series",
) -> list[dict[str, Any]]:
    """Find the studies or series of an accession number on a DICOM or DICOMweb node.

    Args:
        target: The node's target name (direction ``pull`` or ``both``).
        accession: The accession number (no wildcards).
        filters: DICOM keyword → value or list of values, e.g.
            ``{"Modality": ["CT", "MR"], "SeriesDescription": "*head*"}``.
        level: ``series`` (one row per series) or ``study``.

    Returns:
        Rows keyed by DICOM keywords (also published as a table artifact).
    """
    logger = get_run_logger()
    wanted = normalize_filters(filters)
    if level not in ("study", "series"):
        raise QueryError(f"level must be 'study' or 'series', not {level!r}")
    block = await aload_source(target)
    chosen: Level = "study" if level == "study" else "series"
    rows = await anyio.to_thread.run_sync(block.find, accession, dict(wanted), chosen)
    logger.info("%d %s row(s) for accession %s on %s", len(rows), level, accession, target)
    description = f"{level} rows for accession {accession} on {target}"
    if rows:
        await acreate_table_artifact(
            table=rows, key=artifact_key("query", accession), description=description
        )
    else:
        await acreate_markdown_artifact(
            markdown=f"No {level} found for accession `{accession}` on `{target}`.",
            key=artifact_key("query", accession),
            description=description,
        )
    return rows


def _retrieve_run_name() -> str:
    params = current_run.parameters
    return f"{params.get('accession', '')} from {params.get('target', '')}".strip()


async def _settle_batch_of(flow: Any, flow_run: FlowRun, state: State[Any]) -> None:
    """Hook on a retrieve's final state: the last child of a batch settles the batch run.

    A hook runs after the run's own final state is recorded, so of two children ending at
    the same moment at least one sees the other ended too.
    """
    batch = next((t[len(BATCH_TAG) :] for t in flow_run.tags if t.startswith(BATCH_TAG)), None)
    if batch is not None:
        await settle_batch(batch)


@flow(
    name="retrieve",
    flow_run_name=_retrieve_run_name,
    persist_result=False,
    on_completion=[_settle_batch_of],
    on_failure=[_settle_batch_of],
    on_crashed=[_settle_batch_of],
    on_cancellation=[_settle_batch_of],
)
async def retrieve(
    target: str,
    accession: str,
    filters: dict[str, Any] | None = None,
    destination: str = OUTGOING,
    targets: list[str] | None = None,
) -> dict[str, Any]:
    """Fetch what ``query`` finds for one accession number into a folder or the outgoing queue.

    Args:
        target: The node to retrieve from (direction ``pull`` or ``both``).
        accession: The accession number.
        filters: As for ``query``; only the matching series are fetched.
        destination: A folder (files go to ``<destination>/<job id>/<accession>/``, with
            ``<destination>/<job id>/.complete`` when the job is whole; the job id is this run's
            id, or the batch run's id for a batch child), or ``outgoing``: a new case in the
            outgoing queue whose task.json names ``targets``.
        targets: The target names of the new case (``destination="outgoing"`` only).

    Returns:
        Where the files went, how many, how long.
    """
    settings = await aload_settings()
    await hold_for_offpeak(settings)
    batch = batch_of_current_run()
    accession = check_accession(accession)
    wanted = normalize_filters(filters)
    job_id = batch or run_id()
    retrieval = Retrieval(settings, target, accession, wanted)
    if destination == OUTGOING:
        outcome = await retrieve_to_outgoing(retrieval, targets, job_id)
    elif Path(destination).expanduser().is_absolute():
        job_dir = Path(destination).expanduser() / job_id
        outcome = await retrieve_to_folder(retrieval, job_dir, whole_job=batch is None)
    else:
        raise ConfigError(f"destination must be an absolute folder or {OUTGOING!r}")
    outcome.update({"target": target, "accession": accession, "job_id": job_id})
    if batch:
        await after_child(batch, destination)
    return outcome


def _batch_run_name() -> str:
    params = current_run.parameters
    count = len(parse_accessions(params.get("accessions") or []))
    return f"{count} accession(s) from {params.get('target', '')}"


@flow(name="retrieve_batch", flow_run_name=_batch_run_name, persist_result=False)
async def retrieve_batch(
    target: str,
    accessions: list[str],
    filters: dict[str, Any] | None = None,
    destination: str = OUTGOING,
    targets: list[str] | None = None,
    offpeak: bool = False,
) -> Any:
    """Check a list of accession numbers, then start one ``retrieve`` deployment run for each.

    Args:
        target: The node to retrieve from.
        accessions: Accession numbers (a list, or one text with commas/new lines).
        filters: As for ``query``, applied to every accession.
        destination: A folder (``<destination>/<this run's id>/<accession>/``, ``.complete``
            when all are there) or ``outgoing`` (one new case per accession, sent to
            ``targets``).
        targets: Target names of the new cases (``destination="outgoing"``).
        offpeak: Schedule the retrievals into the off-peak window of ``DispatcherSettings``.

    Returns:
        The batch id (this run's id), the child run per accession and when they are scheduled.
    """
    result = await start_batch(target, accessions, filters, destination, targets, offpeak)
    async with get_client() as client:  # children that ended already (a rerun, a fast Runner)
        settled = settled_state(await children_of(client, result["batch_id"]), result["total"])
    if settled is not None and settled.is_failed():
        settled.data = result
        return settled
    return result
