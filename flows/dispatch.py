"""``dispatch_case``: one attempt at sending one case folder to every target it names.

A flow run per attempt (async: a sync flow pays a 1 s heartbeat join per run), one
``send_to_target`` task run per pending target, all concurrent. The folder and its ``task.json``
stay the source of truth: each target's outcome is written as it finishes, and the attempt ends
with the case moved to success/, back in the queue for a retry, or in error/ with the reason.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

from prefect import flow, get_run_logger, tags
from prefect.artifacts import acreate_markdown_artifact
from prefect.client.orchestration import get_client
from prefect.client.schemas.objects import State
from prefect.context import TagsContext
from prefect.runtime import flow_run as current_run

from blocks.base import DispatchTarget
from blocks.errors import CaseError, ConfigError, describe_error
from blocks.registry import aload_settings, aload_target
from blocks.settings import DispatcherSettings
from flows._loop_context import loop_settings, set_loop_settings
from tasks import casefolder as cf
from tasks.admission import shared_admission
from tasks.send import send_tags, send_to_target
from tasks.taskjson import Task, TaskFileError, read_task, read_task_raw, target_names

__all__ = ["CaseOutcome", "case_run_name", "case_tags", "dispatch_case"]

LOGGER = logging.getLogger(__name__)
SENT_REPORT = "sent.txt"


@dataclass
class CaseOutcome:
    """Where an attempt left the case, and what happened per target."""

    case_id: str
    location: str  # "success", "error", "outgoing" (retry later) or "skipped"
    path: str
    reason: str = ""
    targets: dict[str, dict[str, Any]] = field(default_factory=dict)

    @property
    def succeeded(self) -> bool:
        return self.location == "success"


def _resolve(case: str, settings: DispatcherSettings) -> Path:
    """A case id or folder in outgoing/ (or error/, then restarted as mercure's UI does)."""
    outgoing, _, error = settings.folders()
    path = Path(case)
    candidates = [path] if path.is_absolute() or path.exists() else [outgoing / case, error / case]
    for cand in candidates:
        if cand.is_dir():
            if cand.resolve().parent == error.resolve():
                return cf.restart_case(cand, outgoing)
            return cand
    raise CaseError(f"no case folder {case!r} in {outgoing} or {error}")


def case_tags(case_dir: Path, task: Task | None, priority: str | None = None) -> list[str]:
    """Flow-run tags that let a person find a case in the UI by id, accession or MRN."""
    out = [f"case:{task.id if task else case_dir.name}"]
    if task is not None:
        if task.info.acc:
            out.append(f"acc:{task.info.acc}")
        if task.info.mrn:
            out.append(f"mrn:{task.info.mrn}")
    if priority:
        out.append(f"priority:{priority}")
    return out


def case_run_name() -> str:
    """``<accession> <mrn> <case id>`` read from the case's task.json when it can be."""
    case = str(current_run.parameters.get("case", ""))
    path = Path(case)
    try:
        raw = read_task_raw(path) if path.is_dir() else {}
    except TaskFileError:
        raw = {}
    info = raw.get("info")
    if not isinstance(info, dict):
        info = {}
    parts = [str(info.get("acc") or ""), str(info.get("mrn") or ""), path.name or case]
    return " ".join(p for p in parts if p) or "case"


async def _add_run_tags(wanted: list[str]) -> None:
    have = set(current_run.tags or [])
    if set(wanted) <= have:
        return
    run_id = current_run.id
    if run_id is None:
        return
    async with get_client() as client:
        await client.update_flow_run(run_id, tags=sorted(have | set(wanted)))


def _report_names(targets: list[str], blocks: dict[str, DispatchTarget]) -> dict[str, str]:
    """``sent.txt`` for a lone DICOM target (mercure's name), ``sent.<name>.txt`` for several."""
    dicom = [t for t in targets if blocks[t].writes_dcmsend_report]
    if len(dicom) == 1:
        return {dicom[0]: SENT_REPORT}
    return {t: f"sent.{t}.txt" for t in dicom}


@flow(name="dispatch_case", flow_run_name=case_run_name, persist_result=False, log_prints=False)
async def dispatch_case(case: str) -> dict[str, Any]:
    """Send a case to every target its task.json names that is not complete yet.

    Args:
        case: The case folder, or a case id in the outgoing (or error) folder.

    Returns:
        Where the case ended (``success``, ``error``, ``outgoing`` for a later retry) and the
        outcome per target.
    """
    settings: DispatcherSettings = loop_settings() or await aload_settings()
    case_dir = _resolve(case, settings)
    run_id = str(current_run.id) if current_run.id else None
    owner = cf.read_claim(case_dir)
    if owner is not None and owner.is_this_process():
        if run_id:
            cf.record_claim_run(case_dir, run_id)
    elif not cf.claim_case(case_dir, run_id):
        raise CaseError(f"case {case_dir.name} is already being dispatched (.processing exists)")
    try:
        outcome = await _dispatch_claimed(case_dir, settings)
    except (asyncio.CancelledError, KeyboardInterrupt):
        # Shutdown: the case goes back to the queue as it is; nothing is counted against it.
        cf.release_claim(case_dir)
        raise
    except BaseException:
        # Anything unexpected: never leave the case stuck. Count the attempt and free the claim.
        if case_dir.exists():
            _fail_attempt(case_dir, settings, "the attempt ended unexpectedly")
        raise
    await _publish(outcome)
    return {
        "case_id": outcome.case_id,
        "location": outcome.location,
        "path": outcome.path,
        "reason": outcome.reason,
        "targets": outcome.targets,
    }


def _to_error(case_dir: Path, settings: DispatcherSettings, reason: str) -> CaseOutcome:
    _, _, error = settings.folders()
    dest = cf.move_case(case_dir, error, fail_stage=cf.FAIL_STAGE, reason=reason)
    return CaseOutcome(case_dir.name, "error", str(dest), reason)


def _fail_attempt(case_dir: Path, settings: DispatcherSettings, reason: str) -> CaseOutcome:
    """mercure's failure path: count the attempt; retry later, or error/ when exhausted."""
    try:
        retry = cf.record_failed_attempt(case_dir, settings.retry_max, settings.retry_delay)
    except TaskFileError as exc:
        return _to_error(case_dir, settings, f"{reason}; {exc}")
    if retry:
        cf.release_claim(case_dir)
        return CaseOutcome(case_dir.name, "outgoing", str(case_dir), reason)
    return _to_error(case_dir, settings, f"Max retries reached: {reason}")


async def _dispatch_claimed(case_dir: Path, settings: DispatcherSettings) -> CaseOutcome:
    logger = get_run_logger()
    try:
        _, task = read_task(case_dir)
    except TaskFileError as exc:
        return _to_error(case_dir, settings, str(exc))
    targets = target_names(task)
    await _add_run_tags(case_tags(case_dir, task))
    if not targets:
        return _to_error(
            case_dir, settings, f"No targets provided. Unable to dispatch job {task.id}"
        )
    blocks: dict[str, DispatchTarget] = {}
    for name in targets:
        try:
            blocks[name] = await aload_target(name)
        except ConfigError as exc:
            reason = f"{exc}. Unable to start dispatching of job {task.id}"
            return _to_error(case_dir, settings, reason)
    raw = cf.reset_status_if_mismatched(case_dir, targets)
    status = raw["dispatch"]["status"]
    pending = [t for t in targets if status.get(t, {}).get("state") != "complete"]
    reports = _report_names(targets, blocks)
    _configure_admission(settings, blocks)
    logger.info("case %s: sending to %s", task.id, ", ".join(pending) or "nothing (all complete)")

    results = await asyncio.gather(
        *(
            _send_one(case_dir, name, blocks[name], reports.get(name), settings.quick_retry_delays)
            for name in pending
        )
    )
    per_target = dict(zip(pending, results, strict=True))
    failed = {name: r["message"] for name, r in per_target.items() if r["state"] != "complete"}
    outcome: CaseOutcome
    if not failed:
        _, success, _ = settings.folders()
        dest = cf.move_case(case_dir, success)
        outcome = CaseOutcome(task.id, "success", str(dest))
    else:
        reason = "; ".join(f"{name}: {message}" for name, message in failed.items())
        outcome = _fail_attempt(case_dir, settings, reason)
        outcome.case_id = task.id
        logger.warning("case %s: %s -> %s", task.id, reason, outcome.location)
    outcome.targets = per_target
    return outcome


def _configure_admission(settings: DispatcherSettings, blocks: dict[str, DispatchTarget]) -> None:
    shared_admission().set_limit("dicom-dispatch", settings.num_proc)
    for kind, limit in settings.type_limits.items():
        shared_admission().set_limit(f"target-type:{kind}", limit)
    for name, block in blocks.items():
        shared_admission().set_limit(f"target:{name}", block.max_concurrent_sends)


async def _send_one(
    case_dir: Path,
    name: str,
    block: DispatchTarget,
    report: str | None,
    retry_delays: list[float],
) -> dict[str, Any]:
    """Run the send task for one target and record its outcome in task.json at once."""
    run_tags = send_tags(name, block.target_type)
    task = send_to_target.with_options(
        tags=run_tags,
        task_run_name=f"send-{name}",
        retries=len(retry_delays),
        retry_delay_seconds=list(retry_delays) or 0,
    )
    # The send task takes only the send tags: with the case's flow-run tags too (case:<id>…),
    # every case would have its own tag set, and Prefect keeps a slot-acquisition service
    # (a thread, a loop, a client) alive per tag set: a leak of ≈ 2 MB and a thread per case.
    async with shared_admission().admit(run_tags):
        with TagsContext(current_tags=set()):
            state: State[dict[str, Any]] = await cast(
                Awaitable[State[dict[str, Any]]],
                task(str(case_dir), name, report, return_state=True),
            )
    if state.is_completed():
        result: dict[str, Any] = await state.aresult()
        cf.set_target_status(case_dir, name, "complete")
        return {"state": "complete", "message": "", **result}
    try:
        outcome = await state.aresult(raise_on_failure=False)
    except Exception as exc:  # the result itself could not be read
        outcome = exc
    error = outcome if isinstance(outcome, BaseException) else None
    message = describe_error(error if error is not None else state.message or "send failed")
    cf.set_target_status(case_dir, name, "error", message)
    return {"state": "error", "message": message}


async def _publish(outcome: CaseOutcome) -> None:
    """A markdown artifact per case: targets, files, bytes, outcome."""
    rows = "\n".join(
        f"| {name} | {r.get('state')} | {r.get('files', '')} | {r.get('bytes', '')} | "
        f"{(r.get('detail') or r.get('message') or '').replace('|', '/')} |"
        for name, r in outcome.targets.items()
    )
    markdown = (
        f"## Case `{outcome.case_id}`: {outcome.location}\n\n"
        f"Folder: `{outcome.path}`\n\n"
        + (f"Reason: {outcome.reason}\n\n" if outcome.reason else "")
        + "| target | state | files | bytes | detail |\n|---|---|---|---|---|\n"
        + (rows or "| (none) | | | | |")
    )
    key = "case-" + "".join(c if c.isalnum() else "-" for c in outcome.case_id.lower())[:60]
    await acreate_markdown_artifact(markdown=markdown, key=key, description="dispatch outcome")


async def run_case(
    case_dir: Path,
    priority: str | None = None,
    task: Task | None = None,
    settings: DispatcherSettings | None = None,
) -> bool:
    """Dispatch one (already claimed) case as a top-level flow run in this process.

    The tags are given at creation and the dispatcher's settings are handed over, so the run
    makes no API calls for either.
    """
    if settings is not None:
        set_loop_settings(settings)
    try:
        with tags(*case_tags(case_dir, task, priority)):
            result = await dispatch_case(str(case_dir))
        return bool(result.get("location") == "success")
    except Exception:
        LOGGER.exception("case %s: the dispatch run failed", case_dir.name)
        return False
