"""Query and retrieve: ``query``, ``retrieve`` and ``retrieve_batch`` (DESIGN 4.3).

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

Batch operations (:func:`pause_batch`, :func:`resume_batch`, :func:`retry_batch`,
:func:`batch_status`) work on the children through Prefect's API; the CLI's ``batch`` command
calls them. In the UI, children show as ``Paused`` (with Resume), ``Failed`` (with Retry), etc.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import json
import os
import re
import shutil
import uuid
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast
from uuid import UUID

import anyio
from prefect import flow, get_run_logger, task
from prefect.artifacts import (
    acreate_markdown_artifact,
    acreate_progress_artifact,
    acreate_table_artifact,
    aupdate_progress_artifact,
)
from prefect.cache_policies import NO_CACHE
from prefect.client.orchestration import PrefectClient, get_client
from prefect.client.schemas.filters import (
    FlowRunFilter,
    FlowRunFilterTags,
)
from prefect.client.schemas.objects import Artifact, FlowRun, State, StateType
from prefect.client.schemas.sorting import FlowRunSort
from prefect.deployments import arun_deployment
from prefect.exceptions import ObjectNotFound, Pause
from prefect.runtime import flow_run as current_run
from prefect.states import AwaitingRetry, Paused, Scheduled

from blocks.base import QueryTarget
from blocks.errors import ConfigError, TransientTargetError, describe_error
from blocks.qr import (
    AccessionNotFound,
    Level,
    QueryError,
    RetrieveResult,
    check_accession,
    normalize_filters,
    not_found,
)
from blocks.registry import aload_settings, aload_target
from blocks.settings import DispatcherSettings
from tasks import casefolder as cf
from tasks.taskjson import new_task, parse_task, write_task

__all__ = [
    "BATCH_TAG",
    "OUTGOING",
    "PROGRESS_LISTENERS",
    "RETRIEVE_DEPLOYMENT",
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

#: ``destination`` value meaning "the outgoing queue, as a new case".
OUTGOING = "outgoing"
RETRIEVE_DEPLOYMENT = "retrieve/retrieve"
BATCH_TAG = "batch:"
OFFPEAK_TAG = "offpeak"
RETRIEVE_TAG = "dicom-dispatch-retrieve"
#: Seconds between progress artifact updates while objects arrive.
PROGRESS_INTERVAL = 0.5
_SAFE = re.compile(r"[^A-Za-z0-9._-]")
#: Called with (received, expected) as objects arrive in this process (the CLI's progress bar).
PROGRESS_LISTENERS: list[Callable[[int, int | None], None]] = []
#: Runs that have not been picked up yet (a Pending run is already starting: it may finish).
_WAITING = (StateType.SCHEDULED,)
_AGAIN = (StateType.FAILED, StateType.CRASHED, StateType.CANCELLED)


# --------------------------------------------------------------------------------------------
# Small pure helpers
# --------------------------------------------------------------------------------------------


def parse_accessions(value: str | Iterable[str]) -> list[str]:
    """Accession numbers from a list or a text (one per line or comma-separated), trimmed, in
    order, without duplicates or empty entries."""
    items = [value] if isinstance(value, str) else list(value)
    out: list[str] = []
    for item in items:
        for part in re.split(r"[,\n\r]", str(item)):
            text = part.strip()
            if text and text not in out:
                out.append(text)
    return out


def accession_folder_name(accession: str) -> str:
    """A folder name for an accession number (anything but ``A-Za-z0-9._-`` becomes ``_``)."""
    name = _SAFE.sub("_", accession.strip())
    return name if name.strip(".") else "_"


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


def _now() -> dt.datetime:
    return dt.datetime.now().astimezone()


def _artifact_key(prefix: str, text: str) -> str:
    slug = re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")
    return f"{prefix}-{slug}"[:100].rstrip("-")


async def _load_source(name: str) -> QueryTarget:
    target = await aload_target(name)
    if not isinstance(target, QueryTarget):
        raise ConfigError(f"target {name} ({target.target_type}) cannot be queried")
    return target


def _run_id() -> str:
    return str(current_run.id) if current_run.id else uuid.uuid4().hex


def _batch_of_current_run() -> str | None:
    for tag in current_run.tags or []:
        if str(tag).startswith(BATCH_TAG):
            return str(tag)[len(BATCH_TAG) :]
    return None


# --------------------------------------------------------------------------------------------
# query
# --------------------------------------------------------------------------------------------


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
    block = await _load_source(target)
    chosen: Level = "study" if level == "study" else "series"
    rows = await anyio.to_thread.run_sync(block.find, accession, dict(wanted), chosen)
    logger.info("%d %s row(s) for accession %s on %s", len(rows), level, accession, target)
    description = f"{level} rows for accession {accession} on {target}"
    if rows:
        await acreate_table_artifact(
            table=rows, key=_artifact_key("query", accession), description=description
        )
    else:
        await acreate_markdown_artifact(
            markdown=f"No {level} found for accession `{accession}` on `{target}`.",
            key=_artifact_key("query", accession),
            description=description,
        )
    return rows


# --------------------------------------------------------------------------------------------
# retrieve
# --------------------------------------------------------------------------------------------


@dataclass
class _Progress:
    """Received/expected, written by the retrieving thread, read by the artifact updater."""

    received: int = 0
    expected: int | None = None
    done: asyncio.Event = field(default_factory=asyncio.Event)

    def __call__(self, received: int, expected: int | None) -> None:
        self.received, self.expected = received, expected
        for listener in PROGRESS_LISTENERS:
            listener(received, expected)

    def text(self) -> str:
        total = self.expected if self.expected is not None else "?"
        remaining = "" if self.expected is None else f", {max(0, self.expected - self.received)} "
        return f"{self.received} / {total} instances received" + (
            f"{remaining}remaining" if remaining else ""
        )

    def percent(self) -> float:
        if not self.expected:
            return 0.0
        return min(100.0, 100.0 * self.received / self.expected)


async def _follow(progress: _Progress, artifact: UUID) -> None:
    last: tuple[int, int | None] = (-1, None)
    while not progress.done.is_set():
        now = (progress.received, progress.expected)
        if now != last:
            last = now
            with contextlib.suppress(Exception):  # progress display must not fail a retrieve
                await aupdate_progress_artifact(
                    artifact, progress.percent(), description=progress.text()
                )
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(progress.done.wait(), PROGRESS_INTERVAL)


def _transient_only(task_: Any, task_run: Any, state: State[Any]) -> bool:
    return isinstance(state.data, TransientTargetError)


@task(
    name="retrieve_accession",
    task_run_name="retrieve-{accession}",
    retries=2,
    retry_delay_seconds=[2, 10],
    retry_condition_fn=_transient_only,
    cache_policy=NO_CACHE,
    persist_result=False,
)
async def retrieve_accession(
    target: str, accession: str, filters: dict[str, list[str]], folder: str
) -> dict[str, Any]:
    """Fetch one accession's instances into ``folder`` (progress artifact on this run)."""
    logger = get_run_logger()
    block = await _load_source(target)
    progress = _Progress()
    artifact = await acreate_progress_artifact(
        0.0, description=f"retrieving accession {accession} from {target}"
    )
    follower = asyncio.create_task(_follow(progress, artifact))
    fetch = block.retrieve
    try:
        result = cast(
            RetrieveResult,
            await anyio.to_thread.run_sync(fetch, accession, filters, Path(folder), progress),
        )
    finally:
        progress.done.set()
        await follower
    await aupdate_progress_artifact(artifact, 100.0, description=progress.text())
    logger.info(
        "accession %s: %d instances, %d bytes by %s (%s) in %.2f s",
        accession,
        len(result.instances),
        result.bytes,
        result.method,
        result.backend,
        result.elapsed,
    )
    return {
        "instances": len(result.instances),
        "bytes": result.bytes,
        "method": result.method,
        "backend": result.backend,
        "elapsed": round(result.elapsed, 3),
    }


def _retrieve_run_name() -> str:
    params = current_run.parameters
    return f"{params.get('accession', '')} from {params.get('target', '')}".strip()


@flow(name="retrieve", flow_run_name=_retrieve_run_name, persist_result=False)
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
    logger = get_run_logger()
    settings = await aload_settings()
    batch = _batch_of_current_run()
    if batch and OFFPEAK_TAG in (current_run.tags or []):
        later = next_offpeak_start(settings.offpeak_start, settings.offpeak_end, _now())
        if later is not None and current_run.id is not None:
            # Started outside the window (resumed from the UI, or the window closed while it
            # waited): back to Scheduled at the next window start, and this process ends. A
            # flow cannot return a non-final state, so the state is set here and the engine
            # told (Pause) to end the process without proposing a state of its own.
            logger.info("off-peak batch outside the window: rescheduled to %s", later)
            async with get_client() as client:
                state: State[Any] = Scheduled(
                    scheduled_time=later, message="waiting for the off-peak window"
                )
                await _set_state(client, UUID(str(current_run.id)), state)
            raise Pause("rescheduled into the off-peak window", state=state)
    accession = check_accession(accession)
    wanted = normalize_filters(filters)
    job_id = batch or _run_id()
    if destination != OUTGOING and not Path(destination).expanduser().is_absolute():
        raise ConfigError(f"destination must be an absolute folder or {OUTGOING!r}")
    if destination == OUTGOING:
        outcome = await _retrieve_to_outgoing(settings, target, accession, wanted, targets, job_id)
    else:
        folder = Path(destination).expanduser()
        outcome = await _retrieve_to_folder(settings, folder, job_id, target, accession, wanted)
    outcome.update({"target": target, "accession": accession, "job_id": job_id})
    if batch:
        await _after_child(batch, destination)
    return outcome


async def _fetch(
    settings: DispatcherSettings,
    target: str,
    accession: str,
    filters: dict[str, list[str]],
    folder: Path,
) -> dict[str, Any]:
    """The retrieve task, with the quick retries of ``DispatcherSettings`` (transient only)."""
    delays = list(settings.quick_retry_delays)
    fetch = retrieve_accession.with_options(retries=len(delays), retry_delay_seconds=delays or 0)
    return await fetch(target, accession, filters, str(folder))


async def _retrieve_to_folder(
    settings: DispatcherSettings,
    base: Path,
    job_id: str,
    target: str,
    accession: str,
    filters: dict[str, list[str]],
) -> dict[str, Any]:
    job_dir = base / job_id
    final = job_dir / accession_folder_name(accession)
    if final.is_dir():
        return {"destination": str(final), "instances": _count(final), "already_there": True}
    staging = job_dir / f".{final.name}.partial"
    shutil.rmtree(staging, ignore_errors=True)
    job_dir.mkdir(parents=True, exist_ok=True)
    try:
        result = await _fetch(settings, target, accession, filters, staging)
        _fsync_folder(staging)
        os.replace(staging, final)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    if _batch_of_current_run() is None:
        (job_dir / cf.COMPLETE).touch()
    return {"destination": str(final), **result}


async def _retrieve_to_outgoing(
    settings: DispatcherSettings,
    target: str,
    accession: str,
    filters: dict[str, list[str]],
    targets: Sequence[str] | None,
    job_id: str,
) -> dict[str, Any]:
    names = _check_case_targets(targets)
    for name in names:
        await aload_target(name)  # ConfigError now, not a case in error/ later
    source = await _load_source(target)
    outgoing, success, error = settings.folders()
    outgoing.mkdir(parents=True, exist_ok=True)
    # The same job and accession always make the same case: a rerun after the case was
    # queued (a crash before the run could report) finds it instead of queueing it twice.
    case_id = str(uuid.uuid5(uuid.NAMESPACE_URL, f"dicom-dispatch:{job_id}:{accession}"))
    case_dir = outgoing / case_id
    for done in (case_dir, success / case_id, error / case_id):
        if done.is_dir() and not (done / cf.LOCK).exists():
            return {"destination": str(done), "case_id": case_id, "already_there": True}
    shutil.rmtree(case_dir, ignore_errors=True)  # what a crashed attempt left under .lock
    case_dir.mkdir()
    (case_dir / cf.LOCK).touch()  # mercure's "being written": the dispatcher keeps away
    try:
        result = await _fetch(settings, target, accession, filters, case_dir)
        write_task(case_dir, _case_task(case_id, case_dir, accession, source, names))
        _fsync_folder(case_dir)
    except BaseException:
        shutil.rmtree(case_dir, ignore_errors=True)
        raise
    (case_dir / cf.LOCK).unlink()
    return {"destination": str(case_dir), "case_id": case_id, "targets": names, **result}


def _check_case_targets(targets: Sequence[str] | str | None) -> list[str]:
    names = parse_accessions(targets) if targets else []  # same splitting and trimming
    if not names:
        raise ConfigError('destination "outgoing" needs the targets the new case is sent to')
    return names


def _case_task(
    case_id: str, case_dir: Path, accession: str, source: QueryTarget, targets: list[str]
) -> dict[str, Any]:
    """A task.json as mercure's router writes it for a study case (reference §2.7)."""
    from pydicom import dcmread

    first = next(iter(sorted(case_dir.glob("*.dcm"))), None)
    ds = dcmread(first, stop_before_pixels=True) if first is not None else None

    def tag(keyword: str) -> str:
        return str(ds.get(keyword, "") or "") if ds is not None else ""

    origin = source.case_origin()
    raw = new_task(
        case_id,
        targets,
        uid=tag("StudyInstanceUID"),
        uid_type="study",
        patient_name=tag("PatientName"),
        mrn=tag("PatientID"),
        acc=accession,
        sender_address=origin.address,
        mercure_server=os.uname().nodename,
        sender_aet=origin.sender_aet,
        receiver_aet=origin.receiver_aet,
        retrieved_from=source.target_name,
    )
    parse_task(raw)  # our own output must pass the dispatcher's validation
    return raw


def _count(folder: Path) -> int:
    return sum(1 for p in folder.glob("*.dcm") if p.is_file())


def _fsync_folder(folder: Path) -> None:
    """Flush the received files and the folder entry before they are announced as complete."""
    for path in folder.iterdir():
        if path.is_file():
            with open(path, "rb") as fh:
                os.fsync(fh.fileno())
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# --------------------------------------------------------------------------------------------
# retrieve_batch
# --------------------------------------------------------------------------------------------


def _batch_run_name() -> str:
    params = current_run.parameters
    count = len(parse_accessions(params.get("accessions") or []))
    return f"{count} accession(s) from {params.get('target', '')}"


@task(name="check_accessions", cache_policy=NO_CACHE, persist_result=False)
async def check_accessions(
    target: str, accessions: list[str], filters: dict[str, list[str]]
) -> dict[str, int]:
    """Fail fast, naming every accession number the node has nothing for (with the filters)."""
    block = await _load_source(target)
    find = block.find
    missing: list[str] = []
    studies: dict[str, int] = {}
    for accession in accessions:
        rows = await anyio.to_thread.run_sync(find, accession, filters, "study")
        if rows:
            studies[accession] = len(rows)
        else:
            missing.append(accession)
    if missing:
        error = not_found(", ".join(missing), filters)
        raise AccessionNotFound(f"{error} ({len(missing)} of {len(accessions)})")
    return studies


@flow(name="retrieve_batch", flow_run_name=_batch_run_name, persist_result=False)
async def retrieve_batch(
    target: str,
    accessions: list[str],
    filters: dict[str, Any] | None = None,
    destination: str = OUTGOING,
    targets: list[str] | None = None,
    offpeak: bool = False,
) -> dict[str, Any]:
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
    logger = get_run_logger()
    settings = await aload_settings()
    batch_id = _run_id()
    wanted = normalize_filters(filters)
    numbers = [check_accession(a) for a in parse_accessions(accessions)]
    if not numbers:
        raise QueryError("no accession numbers given")
    if destination == OUTGOING:
        for name in _check_case_targets(targets):
            await aload_target(name)
    elif not Path(destination).expanduser().is_absolute():
        raise ConfigError(f"destination must be an absolute folder or {OUTGOING!r}")
    studies = await check_accessions(target, numbers, wanted)
    when = _now()
    if offpeak:
        when = next_offpeak_start(settings.offpeak_start, settings.offpeak_end, when) or when
    if destination != OUTGOING:
        (Path(destination).expanduser() / batch_id).mkdir(parents=True, exist_ok=True)
    progress = await acreate_progress_artifact(
        0.0,
        key=_artifact_key("batch", batch_id),
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
            if run.state is not None and run.state.type in _AGAIN:  # this batch run is a rerun
                await _set_state(client, run.id, AwaitingRetry(scheduled_time=when))
    logger.info(
        "batch %s: %d retrieval(s) from %s scheduled for %s", batch_id, len(children), target, when
    )
    await acreate_table_artifact(
        table=[
            {"accession": a, "studies": studies.get(a), "flow_run": r} for a, r in children.items()
        ],
        key=_artifact_key("batch-runs", batch_id),
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


def _child_tags(batch_id: str, accession: str, offpeak: bool) -> list[str]:
    tags = [RETRIEVE_TAG, f"{BATCH_TAG}{batch_id}", f"acc:{accession}"]
    return [*tags, OFFPEAK_TAG] if offpeak else tags


async def _set_state(client: PrefectClient, run_id: UUID, state: State[Any]) -> None:
    await client.set_flow_run_state(run_id, state=state, force=True)


# --------------------------------------------------------------------------------------------
# Batch bookkeeping and operations
# --------------------------------------------------------------------------------------------


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
    runs: list[FlowRun] = []
    while True:
        page = await client.read_flow_runs(
            flow_run_filter=FlowRunFilter(tags=FlowRunFilterTags(all_=[f"{BATCH_TAG}{batch_id}"])),
            sort=FlowRunSort.EXPECTED_START_TIME_ASC,
            limit=200,
            offset=len(runs),
        )
        runs.extend(page)
        if len(page) < 200:
            return runs


def _accession_of(run: FlowRun) -> str:
    return str(run.parameters.get("accession", ""))


async def _read_batch(client: PrefectClient, batch_id: str) -> FlowRun:
    try:
        run = await client.read_flow_run(UUID(batch_id))
    except (ValueError, ObjectNotFound):
        raise ConfigError(f"no batch run {batch_id}") from None
    if run.parameters.get("accessions") is None:
        raise ConfigError(f"flow run {batch_id} is not a retrieve_batch run")
    return run


async def batch_status(batch_id: str, *, client: PrefectClient | None = None) -> BatchStatus:
    """Counts per state, one row per child, and the batch's overall state.

    The overall state: ``Failed`` (the check step failed), ``Completed`` (every accession
    retrieved), ``Failed`` (nothing left to run, some failed or were cancelled), ``Paused``
    (children paused, none running), ``Scheduled`` (waiting, e.g. for the off-peak window) or
    ``Running``. Also brings the batch's progress artifact up to date.
    """
    async with _client(client) as c:
        parent = await _read_batch(c, batch_id)
        runs = await _children(c, batch_id)
        expected = parse_accessions(parent.parameters.get("accessions") or [])
        counts: dict[str, int] = {}
        rows = []
        for run in runs:
            name = _state_name(run)
            counts[name] = counts.get(name, 0) + 1
            rows.append(
                {
                    "accession": _accession_of(run),
                    "flow_run": str(run.id),
                    "state": name,
                    "scheduled": run.expected_start_time.isoformat()
                    if run.expected_start_time
                    else None,
                    "message": (run.state.message or "") if run.state else "",
                }
            )
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
    artifact = await latest_artifact(client, _artifact_key("batch", status.batch_id))
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
    response = await client._client.post("/artifacts/filter", json=body)
    response.raise_for_status()
    found = response.json()
    return Artifact.model_validate(found[0]) if found else None


async def _after_child(batch_id: str, destination: str) -> None:
    """A child finished its work: update the batch's progress, and mark a whole folder job."""
    logger = get_run_logger()
    try:
        async with get_client() as client:
            parent = await _read_batch(client, batch_id)
            status = await batch_status(batch_id, client=client)
            if destination != OUTGOING:
                job_dir = Path(destination).expanduser() / batch_id
                expected = parse_accessions(parent.parameters.get("accessions") or [])
                here = {p.name for p in job_dir.iterdir() if p.is_dir()}
                if all(accession_folder_name(a) in here for a in expected):
                    (job_dir / cf.COMPLETE).touch()
                    logger.info("batch %s is complete: %s", batch_id, job_dir / cf.COMPLETE)
            logger.info("batch %s: %s", batch_id, json.dumps(status.counts))
    except Exception as exc:  # bookkeeping must not fail a retrieval that succeeded
        logger.warning("could not update batch %s: %s", batch_id, describe_error(exc))


async def _resume_time(parent: FlowRun) -> dt.datetime:
    now = _now()
    if parent.parameters.get("offpeak"):
        settings = await aload_settings()
        return next_offpeak_start(settings.offpeak_start, settings.offpeak_end, now) or now
    return now


async def pause_batch(batch_id: str) -> int:
    """Children that have not started yet become ``Paused``; running ones finish. Returns how
    many were paused."""
    async with get_client() as client:
        await _read_batch(client, batch_id)
        paused = 0
        for run in await _children(client, batch_id):
            if run.state is not None and run.state.type in _WAITING:
                await _set_state(client, run.id, Paused(reschedule=True, message="batch paused"))
                paused += 1
        await batch_status(batch_id, client=client)
    return paused


async def resume_batch(batch_id: str) -> int:
    """Paused children are scheduled again (off-peak batches: into the window)."""
    async with get_client() as client:
        parent = await _read_batch(client, batch_id)
        when = await _resume_time(parent)
        resumed = 0
        for run in await _children(client, batch_id):
            if run.state is not None and run.state.type == StateType.PAUSED:
                await _set_state(client, run.id, Scheduled(scheduled_time=when, name="Resumed"))
                resumed += 1
        await batch_status(batch_id, client=client)
    return resumed


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
        again = 0
        for run in runs:
            if run.state is not None and run.state.type in _AGAIN:
                await _set_state(client, run.id, AwaitingRetry(scheduled_time=when))
                again += 1
        await batch_status(batch_id, client=client)
    return again


class _client:
    """Use the caller's client, or open one for the duration of the call."""

    def __init__(self, client: PrefectClient | None) -> None:
        self._given = client
        self._owned: Any = None

    async def __aenter__(self) -> PrefectClient:
        if self._given is not None:
            return self._given
        self._owned = get_client()
        return cast(PrefectClient, await self._owned.__aenter__())

    async def __aexit__(self, *exc: object) -> None:
        if self._owned is not None:
            await self._owned.__aexit__(*exc)
