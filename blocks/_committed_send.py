"""A DICOM send that counts only once the receiver committed it (``storage_commitment``).

Around either backend's C-STOREs (``dcmsend`` or pynetdicom: the files go as usual):

1. the target's earlier transactions in the case folder (``blocks._commitment_record``) say
   which instances are committed or still awaited; only the others are sent;
2. after the C-STOREs, one N-ACTION for the instances just sent (``blocks._commitment``);
3. the answer is awaited up to ``storage_commitment_timeout`` seconds from the request: on the
   same association, or, where this host's ``serve`` runs the listener, as the listener records
   it (the association is then closed after :data:`LISTENER_HOLD` seconds, so a PACS that
   serves one association at a time is not held);
4. the counts (committed / failed / pending, transaction UID) go to
   ``status[target].storage_commitment`` in ``task.json`` and to the send's result.

With ``require`` a case whose instances are not all committed is a failed attempt
(``NotCommittedError``, not quick-retried: each try would wait the timeout again): the next
attempt re-sends only what was neither committed nor is still awaited, then asks again. With
``request`` it is a warning.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from blocks._association import DicomPeer
from blocks._commitment import case_instances, describe, listener_running, request_commitment
from blocks._commitment_record import commitment_state
from blocks.base import SendResult
from blocks.errors import NotCommittedError
from tasks.safefiles import CaseFiles
from tasks.taskjson import update_task

__all__ = ["LISTENER_HOLD", "CommitmentPolicy", "send_committed"]

LOGGER = logging.getLogger(__name__)

#: Seconds the N-ACTION's association stays open for an answer on it when a listener runs.
LISTENER_HOLD = 2.0
_POLL = 0.2


@dataclass(frozen=True)
class CommitmentPolicy:
    """A target's ``storage_commitment`` settings, and how its messages name it."""

    mode: Literal["request", "require"]
    timeout: float
    target: str
    label: str


def send_committed(
    case_dir: Path,
    case: CaseFiles,
    files: Sequence[Path],
    peer: DicomPeer,
    policy: CommitmentPolicy,
    store: Callable[[list[Path]], SendResult],
    logger: logging.Logger | logging.LoggerAdapter[logging.Logger] = LOGGER,
) -> SendResult:
    """Send what is not committed nor awaited with ``store``, ask for its commitment, and wait;
    raises ``NotCommittedError`` under ``require`` unless every instance is committed."""
    instances = case_instances(case, files)
    before = commitment_state(case_dir, policy.target, policy.timeout)
    to_send = [f for f in files if f not in instances or not before.settled(instances[f][1])]
    if to_send:
        result = store(to_send)
    else:
        result = SendResult(
            detail=f"nothing sent: every instance committed or awaited ({peer.address})"
        )
    listening = listener_running(policy.target)
    sent = [instances[f] for f in to_send if f in instances]
    if sent:
        request_commitment(
            peer,
            case_dir,
            policy.target,
            sent,
            hold=min(LISTENER_HOLD, policy.timeout) if listening else policy.timeout,
        )
    state = commitment_state(case_dir, policy.target, policy.timeout)
    while listening and state.pending and state.wait_left > 0:
        time.sleep(min(_POLL, state.wait_left))
        state = commitment_state(case_dir, policy.target, policy.timeout)
    wanted = sorted({uid for _, uid in instances.values()})
    counts = state.counts(wanted)
    _record_counts(case_dir, policy.target, counts)
    text = describe(counts, len(wanted))
    result.extra["storage_commitment"] = counts
    result.detail = f"{result.detail}; {text}" if result.detail else text
    if counts["committed"] < len(wanted):
        why = f"{policy.label}: {text} (transaction {counts['transaction_uid']})"
        if not listening:
            why += "; no storage commitment listener runs here, so only an answer on the same "
            why += "association counts"
        if policy.mode == "require":
            raise NotCommittedError(why)
        logger.warning("%s", why)
    return result


def _record_counts(case_dir: Path, target: str, counts: dict[str, Any]) -> None:
    """``status[target].storage_commitment`` in task.json (the rest of the entry kept)."""

    def change(raw: dict[str, Any]) -> None:
        status = raw.setdefault("dispatch", {}).setdefault("status", {})
        entry = status.get(target)
        if not isinstance(entry, dict):
            entry = status[target] = {}
        entry["storage_commitment"] = counts

    update_task(case_dir, change)
