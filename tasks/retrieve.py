"""The retrieve steps: one accession's instances into a folder, or into outgoing as a new case.

``retrieve_accession`` is the task that talks to the node (the source block's ``retrieve``:
C-GET/C-MOVE or WADO-RS), with a progress artifact of received / expected instances and quick
retries of transient errors only. Around it, the two places a retrieval can land:

* a folder: files arrive in a hidden staging folder (``.<accession>.partial``) that becomes
  ``<job dir>/<accession>`` in one rename, after an fsync, so a reader never sees half a study;
* the outgoing queue: a new case folder written under mercure's ``.lock`` with a ``task.json``
  as mercure's router writes one, so the dispatcher only sees it whole.

``check_accessions`` is a batch's fail-fast step: every accession number the node does not know,
named at once, before any retrieval starts.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import shutil
import uuid
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from uuid import UUID

import anyio
from prefect import get_run_logger, task
from prefect.artifacts import acreate_progress_artifact, aupdate_progress_artifact
from prefect.cache_policies import NO_CACHE

from blocks.base import QueryTarget
from blocks.errors import ConfigError
from blocks.qr import (
    DEFAULT_FREE_SPACE_RESERVE_BYTES,
    DEFAULT_MAX_INSTANCE_BYTES,
    AccessionNotFound,
    ReceiveLimits,
    not_found,
)
from blocks.registry import aload_target
from blocks.settings import DispatcherSettings
from tasks import casefolder as cf
from tasks.retry import peer_task, quick_retries
from tasks.safefiles import ensure_marker
from tasks.taskjson import new_task, parse_task, write_task

__all__ = [
    "OUTGOING",
    "PROGRESS_LISTENERS",
    "Retrieval",
    "accession_folder_name",
    "aload_source",
    "artifact_key",
    "case_targets",
    "check_accessions",
    "parse_accessions",
    "retrieve_accession",
    "retrieve_to_folder",
    "retrieve_to_outgoing",
]

#: ``destination`` value meaning "the outgoing queue, as a new case".
OUTGOING = "outgoing"
#: Seconds between progress artifact updates while objects arrive.
PROGRESS_INTERVAL = 0.5
#: Called with (received, expected) as objects arrive in this process (the CLI's progress bar).
PROGRESS_LISTENERS: list[Callable[[int, int | None], None]] = []
_SAFE = re.compile(r"[^A-Za-z0-9._-]")


# --------------------------------------------------------------------------------------------
# Names
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


def artifact_key(prefix: str, text: str) -> str:
    """An artifact key for a query or a batch (Prefect allows lowercase, digits and dashes)."""
    slug = re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")
    return f"{prefix}-{slug}"[:100].rstrip("-")


def case_targets(targets: Sequence[str] | str | None) -> list[str]:
    """The target names of a new outgoing case; :class:`ConfigError` when there are none."""
    names = parse_accessions(targets) if targets else []  # same splitting and trimming
    if not names:
        raise ConfigError('destination "outgoing" needs the targets the new case is sent to')
    return names


async def aload_source(name: str) -> QueryTarget:
    """The target block ``name`` as a node to query; :class:`ConfigError` if it is not one."""
    target = await aload_target(name)
    if not isinstance(target, QueryTarget):
        raise ConfigError(f"target {name} ({target.target_type}) cannot be queried")
    return target


# --------------------------------------------------------------------------------------------
# The tasks
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


@peer_task("retrieve_accession", task_run_name="retrieve-{accession}")
async def retrieve_accession(
    target: str,
    accession: str,
    filters: dict[str, list[str]],
    folder: str,
    max_instance_bytes: int = DEFAULT_MAX_INSTANCE_BYTES,
    free_space_reserve_bytes: int = DEFAULT_FREE_SPACE_RESERVE_BYTES,
) -> dict[str, Any]:
    """Fetch one accession's instances into ``folder`` (progress artifact on this run), within
    the settings' ``retrieve_max_instance_bytes`` and ``retrieve_free_space_reserve_bytes``."""
    logger = get_run_logger()
    block = await aload_source(target)
    progress = _Progress()
    artifact = await acreate_progress_artifact(
        0.0, description=f"retrieving accession {accession} from {target}"
    )
    follower = asyncio.create_task(_follow(progress, artifact))
    try:
        limits = ReceiveLimits(max_instance_bytes, free_space_reserve_bytes)
        result = await anyio.to_thread.run_sync(
            block.retrieve, accession, filters, Path(folder), progress, limits
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


@task(name="check_accessions", cache_policy=NO_CACHE, persist_result=False)
async def check_accessions(
    target: str, accessions: list[str], filters: dict[str, list[str]]
) -> dict[str, int]:
    """Fail fast, naming every accession number the node has nothing for (with the filters)."""
    block = await aload_source(target)
    missing: list[str] = []
    studies: dict[str, int] = {}
    for accession in accessions:
        rows = await anyio.to_thread.run_sync(block.find, accession, filters, "study")
        if rows:
            studies[accession] = len(rows)
        else:
            missing.append(accession)
    if missing:
        error = not_found(", ".join(missing), filters)
        raise AccessionNotFound(f"{error} ({len(missing)} of {len(accessions)})")
    return studies


@dataclass(frozen=True)
class Retrieval:
    """One accession number to fetch from one node, with the filters and the settings it is
    fetched under: the request both destinations below pass on unchanged to the retrieve task."""

    settings: DispatcherSettings
    target: str
    accession: str
    filters: dict[str, list[str]]

    async def fetch(self, folder: Path) -> dict[str, Any]:
        """The retrieve task into ``folder``, with the quick retries of ``DispatcherSettings``
        (transient only)."""
        fetch = retrieve_accession.with_options(**quick_retries(self.settings.quick_retry_delays))
        limits = self.settings.receive_limits()
        return await fetch(
            self.target,
            self.accession,
            self.filters,
            str(folder),
            limits.max_instance_bytes,
            limits.free_space_reserve_bytes,
        )


# --------------------------------------------------------------------------------------------
# Where the files land
# --------------------------------------------------------------------------------------------


async def retrieve_to_folder(
    retrieval: Retrieval, job_dir: Path, *, whole_job: bool
) -> dict[str, Any]:
    """``<job_dir>/<accession>/`` in one rename; ``<job_dir>/.complete`` too when ``whole_job``
    (a lone retrieval; a batch marks its job once every accession is there)."""
    final = job_dir / accession_folder_name(retrieval.accession)
    if final.is_dir():
        return {"destination": str(final), "instances": _count(final), "already_there": True}
    staging = job_dir / f".{final.name}.partial"
    shutil.rmtree(staging, ignore_errors=True)
    job_dir.mkdir(parents=True, exist_ok=True)
    try:
        result = await retrieval.fetch(staging)
        _fsync_folder(staging)
        os.replace(staging, final)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    if whole_job:
        ensure_marker(job_dir / cf.COMPLETE)
    return {"destination": str(final), **result}


async def retrieve_to_outgoing(
    retrieval: Retrieval, targets: Sequence[str] | None, job_id: str
) -> dict[str, Any]:
    """A new case in the outgoing queue, sent by the dispatcher to ``targets``."""
    names = case_targets(targets)
    for name in names:
        await aload_target(name)  # ConfigError now, not a case in error/ later
    source = await aload_source(retrieval.target)
    accession = retrieval.accession
    outgoing, success, error = retrieval.settings.folders()
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
    ensure_marker(case_dir / cf.LOCK)  # mercure's "being written": the dispatcher keeps away
    try:
        result = await retrieval.fetch(case_dir)
        write_task(case_dir, _case_task(case_id, case_dir, accession, source, names))
        _fsync_folder(case_dir)
    except BaseException:
        shutil.rmtree(case_dir, ignore_errors=True)
        raise
    (case_dir / cf.LOCK).unlink()
    return {"destination": str(case_dir), "case_id": case_id, "targets": names, **result}


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
        if path.is_file() and not path.is_symlink():
            with open(path, "rb") as fh:
                os.fsync(fh.fileno())
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
