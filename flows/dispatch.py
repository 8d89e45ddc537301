"""``dispatch_case``: one attempt at sending one case folder to every target it names.

A flow run per attempt (async: a sync flow pays a 1 s heartbeat join per run), one
``send_to_target`` task run per pending target, all concurrent. The folder and its ``task.json``
stay the source of truth: each target's outcome is written as it finishes, and the attempt ends
with the case moved to success/, back in the queue for a retry, or in error/ with the reason.

Over 400 lines because one attempt's life (claim kept, sends gathered, outcome written, claim
released whatever breaks, the run's final state) must be read in one place to be trusted; what
is not the attempt itself (states, events, metrics, admission) lives in its own module.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

from prefect import flow, get_run_logger, tags
from prefect.artifacts import acreate_markdown_artifact
from prefect.client.orchestration import get_client
from prefect.client.schemas.objects import State
from prefect.context import FlowRunContext, TagsContext
from prefect.runtime import flow_run as current_run
from prefect.settings import get_current_settings

from blocks.base import DispatchTarget
from blocks.errors import CaseError, ConfigError, describe_error
from blocks.prefect_internals import run_created_run
from blocks.registry import aload_settings, aload_target
from blocks.settings import DispatcherSettings
from flows._abort import ABORT_REASON, aborting
from flows._api_outage import is_api_outage
from flows._loop_context import loop_settings, set_loop_settings
from flows.case_events import announce_outcome
from flows.case_states import (
    CaseDeployment,
    already_sent,
    final_state,
    outcome_of,
    skipped,
)
from flows.metrics import case_ready_at, record_case_outcome
from tasks import casefolder as cf
from tasks.admission import shared_admission
from tasks.attempt import (
    Disposition,
    Failed,
    Kind,
    Outage,
    SendOutcome,
    Sent,
    after_counting,
    after_sending,
    on_break,
    refused,
)
from tasks.attempt_claim import AttemptClaim
from tasks.claims import ClaimLost
from tasks.retry import quick_retries
from tasks.safefiles import case_links_problem
from tasks.send import send_tags, send_to_target
from tasks.taskjson import Task, TaskFileError, read_task, read_task_raw, target_names

__all__ = [
    "CaseOutcome",
    "case_run_name",
    "case_tags",
    "dispatch_case",
    "give_up_attempt",
    "locate_case",
    "run_case",
    "run_dispatch",
]

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

    def as_result(self) -> dict[str, Any]:
        return {
            "case_id": self.case_id,
            "location": self.location,
            "path": self.path,
            "reason": self.reason,
            "targets": self.targets,
        }


def locate_case(case: str, settings: DispatcherSettings) -> tuple[str, Path]:
    """Where ``case`` is now: ``("outgoing", folder)`` to dispatch, or ``("success", folder)``.

    ``case`` is a case id or a folder inside outgoing/ or error/ (nothing else: a run parameter
    must not be able to move an arbitrary folder). A case found in error/ is restarted as
    mercure's UI does. A folder that has moved on since the run was created (a UI Retry of an
    older attempt) is looked for by its name in outgoing/, error/ and success/.
    """
    outgoing, success, error = settings.folders()
    roots = {"outgoing": outgoing, "error": error, "success": success}
    path = Path(case)
    if path.is_absolute() or path.exists() or len(path.parts) > 1:
        parent = path.resolve().parent
        if parent not in {outgoing.resolve(), error.resolve(), success.resolve()}:
            raise CaseError(f"{case!r} is not a case folder in {outgoing} or {error}")
    name = path.name
    if not name or name in (".", ".."):
        raise CaseError(f"{case!r} is not a case id")
    for kind, root in roots.items():
        candidate = root / name
        if candidate.is_dir() and not candidate.is_symlink():
            if kind == "error":
                return "outgoing", cf.restart_case(candidate, outgoing)
            return kind, candidate
    raise CaseError(f"no case folder {name!r} in {outgoing} or {error}")


def case_tags(
    case_dir: Path, task: Task | None, priority: str | None = None, *, mrn: bool = True
) -> list[str]:
    """Flow-run tags that let a person find a case in the UI by id, accession or MRN."""
    out = [f"case:{task.id if task else case_dir.name}"]
    if task is not None:
        if task.info.acc:
            out.append(f"acc:{task.info.acc}")
        if task.info.mrn and mrn:
            out.append(f"mrn:{task.info.mrn}")
    if priority:
        out.append(f"priority:{priority}")
    return out


def run_name_for(case_dir: Path, task: Task | None = None, *, mrn: bool = True) -> str:
    """``<accession> <mrn> <case id>``, from the parsed task or the folder's task.json."""
    acc: object
    mrn_value: object
    if task is not None:
        acc, mrn_value = task.info.acc, task.info.mrn
    else:
        try:
            raw = read_task_raw(case_dir) if case_dir.is_dir() else {}
        except TaskFileError:
            raw = {}
        info = raw.get("info")
        if not isinstance(info, dict):
            info = {}
        acc, mrn_value = info.get("acc"), info.get("mrn")
    parts = [str(acc or ""), str((mrn_value if mrn else "") or ""), case_dir.name]
    return " ".join(p for p in parts if p) or "case"


def case_run_labels(
    case_dir: Path,
    task: Task | None,
    priority: str | None,
    settings: DispatcherSettings | None,
) -> tuple[str, list[str]]:
    """(run name, tags) of a case run created for the dispatcher, in process or on a work pool:
    the one place that keeps the MRN out when ``mrn_in_run_names`` is off."""
    mrn = _mrn_shown(settings)
    return run_name_for(case_dir, task, mrn=mrn), case_tags(case_dir, task, priority, mrn=mrn)


def case_run_name() -> str:
    """The run name of a case run; a Retry of a case that moved on keeps the name it had."""
    case = str(current_run.parameters.get("case", ""))
    path = Path(case)
    if not path.is_dir() and current_run.name:
        return str(current_run.name)
    return run_name_for(path, mrn=_mrn_shown(loop_settings())) if case else "case"


def _mrn_shown(settings: DispatcherSettings | None) -> bool:
    """Settings not known yet (a worker's or a UI's run): the MRN stays out until they are."""
    return settings is not None and settings.mrn_in_run_names


async def _keep_mrn_out_of_name(case_dir: Path, settings: DispatcherSettings) -> None:
    """A run started outside the loop was named before the settings were read (without the
    MRN): name it as the settings say."""
    name = run_name_for(case_dir, mrn=settings.mrn_in_run_names)
    if current_run.id is None or current_run.name == name:
        return
    async with get_client() as client:
        await client.update_flow_run(current_run.id, name=name)


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


#: Where a dispatch run's results would go; named here so the engine never asks the server. It
#: asks with the sync client, retrying with sleeps, on the event loop of the in-process runs
#: (Prefect 3.8): with the API down that stalled the whole service for a minute per run.
#: Nothing is written there (``persist_result=False``).
RESULT_STORAGE = Path(get_current_settings().results.local_storage_path)


@flow(
    name="dispatch_case",
    flow_run_name=case_run_name,
    persist_result=False,
    result_storage=RESULT_STORAGE,
    log_prints=False,
)
async def dispatch_case(case: str) -> Any:
    """Send a case to every target its task.json names that is not complete yet.

    The run's final state says where the case is (``flows/case_states.py``): Completed only
    when it reached success/; Failed "RetryPending" when it waits for another attempt; Failed
    when it went to error/; Cancelled "Skipped" when another process holds it.

    Args:
        case: A case id, or the case folder, in the outgoing (or error) folder.

    Returns:
        Where the case ended (``success``, ``error``, ``outgoing`` for a later retry,
        ``skipped``) and the outcome per target.
    """
    settings: DispatcherSettings = loop_settings() or await aload_settings()
    where, case_dir = locate_case(case, settings)
    if where == "success":
        await _add_run_tags(case_tags(case_dir, None))  # findable by case id though not sent
        done = CaseOutcome(case_dir.name, "success", str(case_dir), "already in success/")
        get_run_logger().info("case %s is already in success/ (%s)", case_dir.name, case_dir)
        return already_sent(str(case_dir), done.as_result())
    run_id = str(current_run.id) if current_run.id else None
    claim = AttemptClaim.adopt(case_dir, run_id) or AttemptClaim.take(case_dir, run_id)
    if claim is None:
        owner = cf.read_claim(case_dir)
        holder = f"{owner.host}:{owner.pid}" if owner is not None else "another dispatcher"
        reason = f"case {case_dir.name} is being dispatched by {holder} (.processing exists)"
        await _add_run_tags(case_tags(case_dir, None))
        return skipped(
            reason, CaseOutcome(case_dir.name, "skipped", str(case_dir), reason).as_result()
        )
    ready_at = case_ready_at(case_dir)  # metrics: ready -> success (flows/metrics.py)
    with claim:  # released on the way out, whatever ends the attempt (tasks/attempt_claim.py)
        try:
            await _keep_mrn_out_of_name(case_dir, settings)
            outcome = await _dispatch_claimed(claim, settings)
        except BaseException as exc:
            outage = is_api_outage(exc)
            ending = on_break(
                exc,
                api_outage=outage,
                aborting=aborting(),
                abort_reason=ABORT_REASON,
                why=describe_error(exc),
            )
            if ending.kind is Kind.SKIPPED:
                # Taken over (this process was judged dead): nothing more is sent, moved,
                # counted or released by this attempt; the case is its new owner's.
                LOGGER.warning("%s", exc)
                lost = CaseOutcome(case_dir.name, "skipped", str(case_dir), ending.reason)
                return skipped(ending.reason, lost.as_result())
            if ending.kind is Kind.UNCOUNTED and outage:
                # The Prefect API went away mid-attempt: back to the queue uncounted; the loop
                # claims it again once the API answers (flows/_api_outage.py).
                LOGGER.warning(
                    "case %s: the Prefect API went away mid-attempt (%s); back in the queue, "
                    "attempt not counted",
                    case_dir.name,
                    ending.reason,
                )
            if ending.counts:  # an abort after the grace period (issue 11), a full disk...
                give_up_attempt(case_dir, settings, ending.reason)
            raise
    record_case_outcome(outcome, ready_at)  # metrics (flows/metrics.py)
    await _publish(outcome)
    await announce_outcome(outcome, settings)  # mercure's notifications: success/ or error/
    return final_state(outcome.location, outcome.reason, outcome.as_result())


def give_up_attempt(case_dir: Path, settings: DispatcherSettings, reason: str) -> None:
    """Count a broken attempt and free the claim, if this process still holds it; never raises.

    Recording may itself fail (the disk is full): the claim is released all the same, so the
    case is dispatched again rather than stuck behind a live process that is not working on it.
    """
    claim = AttemptClaim.of(case_dir)
    if not claim.held():
        return
    try:
        _apply(claim, settings, Disposition(Kind.FAILED, reason), case_dir.name)
    except Exception as exc:
        LOGGER.error("case %s: could not record the attempt (%s): %s", case_dir.name, reason, exc)
    finally:
        claim.release()


def _apply(
    claim: AttemptClaim, settings: DispatcherSettings, decided: Disposition, case_id: str
) -> CaseOutcome:
    """Carry out what ``tasks/attempt.py`` decided: move the case, or count the attempt (and
    carry out what that comes to), or leave it for a retry."""
    case_dir = claim.case_dir
    _, success, error = settings.folders()
    if decided.kind is Kind.SUCCESS:
        return CaseOutcome(case_id, "success", str(claim.move(success)))
    if decided.kind is Kind.ERROR:
        dest = claim.move(error, fail_stage=cf.FAIL_STAGE, reason=decided.reason)
        return CaseOutcome(case_id, "error", str(dest), decided.reason)
    if decided.kind is Kind.FAILED:  # mercure's failure path: count the attempt
        claim.ensure_held()
        try:
            retry = cf.record_failed_attempt(case_dir, settings.retry_max, settings.retry_delay)
            counted = after_counting(decided.reason, retry)
        except TaskFileError as exc:
            counted = after_counting(decided.reason, False, str(exc))
        return _apply(claim, settings, counted, case_id)
    if decided.kind is Kind.RETRY:
        claim.release()
        return CaseOutcome(case_id, "outgoing", str(case_dir), decided.reason)
    raise ValueError(f"case {case_dir.name}: {decided.kind} is not an end of an attempt")


async def _dispatch_claimed(claim: AttemptClaim, settings: DispatcherSettings) -> CaseOutcome:
    logger = get_run_logger()
    case_dir = claim.case_dir
    try:
        _, task = read_task(case_dir)
    except TaskFileError as exc:
        return _apply(claim, settings, Disposition(Kind.ERROR, str(exc)), case_dir.name)
    targets = target_names(task)
    await _add_run_tags(case_tags(case_dir, task, mrn=settings.mrn_in_run_names))
    problem = case_links_problem(case_dir, allow_inside=settings.case_links_inside)
    if problem:
        return _apply(claim, settings, refused(problem, task.id), case_dir.name)
    if not targets:
        return _apply(claim, settings, refused("No targets provided", task.id), case_dir.name)
    blocks: dict[str, DispatchTarget] = {}
    for name in targets:
        try:
            blocks[name] = await aload_target(name)
        except ConfigError as exc:
            reason = f"{exc}. Unable to start dispatching of job {task.id}"
            return _apply(claim, settings, Disposition(Kind.ERROR, reason), case_dir.name)
    raw = cf.reset_status_if_mismatched(case_dir, targets)
    status = raw["dispatch"]["status"]
    pending = [t for t in targets if status.get(t, {}).get("state") != "complete"]
    reports = _report_names(targets, blocks)
    _configure_admission(settings, blocks)
    logger.info("case %s: sending to %s", task.id, ", ".join(pending) or "nothing (all complete)")

    results = await asyncio.gather(
        *(_send_one(case_dir, name, blocks[name], reports.get(name), settings) for name in pending),
        return_exceptions=True,
    )
    # Raised only once every send has ended, so none goes on behind a released claim; an
    # outage goes back to the queue uncounted (dispatch_case), and complete targets stay so.
    outcomes: dict[str, SendOutcome] = {}
    for name, result in zip(pending, results, strict=True):
        if isinstance(result, BaseException):
            raise result
        if isinstance(result, Outage):
            raise result.error
        outcomes[name] = result
    claim.ensure_held()  # sends may take long: the case is still ours to move
    # A link planted after the check above was refused by the senders (never followed), or
    # hid a sub-folder from them: the case is unusable as it is, whatever the peers said, so
    # it goes to error/ with the reason at once rather than to a retry or to success/.
    links = case_links_problem(case_dir, allow_inside=settings.case_links_inside)
    decided = after_sending(outcomes, links, task.id)
    outcome = _apply(claim, settings, decided, case_dir.name if links else task.id)
    if decided.counts:
        logger.warning("case %s: %s -> %s", task.id, decided.reason, outcome.location)
    outcome.targets = {
        name: o.status() for name, o in outcomes.items() if isinstance(o, Sent | Failed)
    }
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
    settings: DispatcherSettings,
) -> SendOutcome:
    """Run the send task for one target and record its outcome in task.json at once."""
    run_tags = send_tags(name, block.target_type)
    task = send_to_target.with_options(
        tags=run_tags, task_run_name=f"send-{name}", **quick_retries(settings.quick_retry_delays)
    )
    # The send task takes only the send tags: with the case's flow-run tags too (case:<id>…),
    # every case would have its own tag set, and Prefect keeps a slot-acquisition service
    # (a thread, a loop, a client) alive per tag set: a leak of ≈ 2 MB and a thread per case.
    async with shared_admission().admit(run_tags):
        with TagsContext(current_tags=set()):
            state: State[dict[str, Any]] = await cast(
                Awaitable[State[dict[str, Any]]],
                task(str(case_dir), name, report, settings.case_links_inside, return_state=True),
            )
    if state.is_completed():
        result: dict[str, Any] = await state.aresult()
        cf.set_target_status(case_dir, name, "complete")
        return Sent(result)
    try:
        outcome = await state.aresult(raise_on_failure=False)
    except Exception as exc:  # the result itself could not be read
        outcome = exc
    error = outcome if isinstance(outcome, BaseException) else None
    if isinstance(error, ClaimLost):
        raise error  # nothing was sent; the case, its task.json included, is no longer ours
    if error is not None and is_api_outage(error):
        # Not the target's failure: its slot or its state could not reach the Prefect API.
        return Outage(error, describe_error(error))
    message = describe_error(error if error is not None else state.message or "send failed")
    cf.set_target_status(case_dir, name, "error", message)
    return Failed(message)


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


#: The loop's copy: the run was named when it was created, so the engine need not rename it
#: (``with_options(flow_run_name=None)`` keeps the name function: it is cleared here).
_dispatch_created_run = dispatch_case.with_options()
_dispatch_created_run.flow_run_name = None


async def run_dispatch(case: str) -> dict[str, Any]:
    """``dispatch_case`` as a run in this process; its outcome whatever the final state."""
    state = await dispatch_case(case, return_state=True)
    return await outcome_of(state)


async def run_case(
    case_dir: Path,
    priority: str | None = None,
    task: Task | None = None,
    settings: DispatcherSettings | None = None,
    deployment: CaseDeployment | None = None,
) -> bool:
    """Dispatch one (already claimed) case as a flow run in this process; True if sent.

    With ``deployment`` (the service's loop) the run is created from the ``dispatch-case``
    deployment, named and tagged in that one call, so the UI can Retry it. Inside a flow run
    (the sweep) the case becomes a child run instead. The dispatcher's settings are handed
    over, so the run loads none.
    """
    if settings is not None:
        set_loop_settings(settings)
    name, run_tags = case_run_labels(case_dir, task, priority, settings)
    started = False
    # The claim the loop took: released when the run is over, whatever happened.
    with AttemptClaim.of(case_dir):
        try:
            created = None
            if deployment is not None and FlowRunContext.get() is None:
                async with get_client() as client:
                    created = await deployment.create_run(
                        client, time.monotonic(), str(case_dir), name, run_tags
                    )
            started = True
            if created is not None:
                state = await run_created_run(
                    _dispatch_created_run, created, {"case": str(case_dir)}
                )
            else:
                with tags(*run_tags):
                    state = await dispatch_case(str(case_dir), return_state=True)
            result = await outcome_of(state)
            return bool(result.get("location") == "success")
        except Exception as exc:
            LOGGER.exception("case %s: the dispatch run failed", case_dir.name)
            if started and settings is not None and not is_api_outage(exc):
                reason = f"the dispatch run failed: {describe_error(exc)}"
                give_up_attempt(case_dir, settings, reason)
            # else no run or no API, no attempt: the case waits in the queue
            return False
