"""mercure's case-folder protocol: readiness, ordering, claims, retries and moves.

Every function here works on the file system only (no Prefect), so the protocol can be tested
and reasoned about on its own. The behaviour is mercure's dispatcher (``status.py``,
``dispatcher.py``, ``retry.py``, ``send.py``), with the quirks fixed as architecture §4.1 says:
the 2:1 interleave falls back to the other list, priority is the highest triggered rule,
invalid folders are moved to ``error/`` after a grace period with a reason, and a claim whose
owner is provably gone is released.

Over 400 lines on purpose: the markers, claims, statuses and moves refer to each
other and are checked against mercure's rules together; the tests are split by topic
(``tests/unit/test_casefolder_*.py``).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import errno
import logging
import os
import pwd
import secrets
import shutil
import stat
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tasks.claims import (
    MAX_CLAIM_BYTES,
    PROCESSING,
    ClaimOwner,
    claim_case,
    claim_is_stale,
    read_claim,
    record_claim_run,
    release_claim,
)
from tasks.safefiles import copy_regular, ensure_marker, replace_file
from tasks.taskjson import (
    TASKFILE,
    Task,
    TaskFileError,
    now_str,
    read_task,
    read_task_raw,
    target_names,
    update_task,
)

__all__ = [
    "COMPLETE",
    "ERROR",
    "HALT",
    "LOCK",
    "PROCESSING",
    "REASON_FILE",
    "Candidate",
    "ClaimOwner",
    "Scan",
    "case_priority",
    "claim_case",
    "claim_is_stale",
    "halt",
    "is_halted",
    "is_offpeak",
    "move_case",
    "order_cases",
    "read_claim",
    "record_claim_run",
    "record_failed_attempt",
    "release_claim",
    "reset_status_if_mismatched",
    "restart_case",
    "scan_outgoing",
    "set_target_status",
    "unhalt",
]

LOGGER = logging.getLogger(__name__)

LOCK = ".lock"
ERROR = ".error"
HALT = "HALT"
COMPLETE = ".complete"
REASON_FILE = "dispatch_error.txt"
FAIL_STAGE = "DISPATCHING"
PRIORITY_RANK = {"urgent": 2, "normal": 1, "offpeak": 0}


# ---------------------------------------------------------------------------------------------
# priority and off-peak


def is_offpeak(start: str, end: str, now: dt.time) -> bool:
    """mercure's window test: inclusive, over midnight when start >= end, unparsable = always."""
    try:
        s = dt.datetime.strptime(start, "%H:%M").time()
        e = dt.datetime.strptime(end, "%H:%M").time()
    except (TypeError, ValueError):
        return True
    if s < e:
        return s <= now <= e
    return now >= s or now <= e


def case_priority(task: Task, rule_priorities: Mapping[str, str]) -> str:
    """The applied rule's priority; else the highest of the triggered rules' (urgent > normal >
    offpeak); ``normal`` when no rule is known. (mercure took the first triggered rule and never
    yielded ``offpeak`` for series-level tasks: a quirk fixed here.)"""
    applied = task.info.applied_rule
    if applied and applied in rule_priorities:
        return _known_priority(rule_priorities[applied])
    triggered = task.info.triggered_rules
    found = [
        _known_priority(rule_priorities[name])
        for name in (triggered if isinstance(triggered, dict) else {})
        if name in rule_priorities
    ]
    return max(found, key=PRIORITY_RANK.__getitem__) if found else "normal"


def _known_priority(value: str) -> str:
    return value if value in PRIORITY_RANK else "normal"


# ---------------------------------------------------------------------------------------------
# scanning and ordering


@dataclass(frozen=True)
class Candidate:
    """A case folder with a valid task.json, and what ordering needs to know about it."""

    path: Path
    task: Task
    priority: str
    mtime: float


@dataclass
class Scan:
    """One look at the outgoing folder."""

    halted: bool = False
    ready: list[Candidate] = field(default_factory=list)
    not_due: list[Candidate] = field(default_factory=list)
    claimed: list[Path] = field(default_factory=list)
    busy: list[Path] = field(default_factory=list)
    invalid: list[tuple[Path, str]] = field(default_factory=list)
    expired_invalid: list[tuple[Path, str]] = field(default_factory=list)
    #: Folders left where they are until a person acts, and the fix: one the service cannot
    #: read or write, or whose ``.processing`` is not a small regular file (a foreign claim
    #: that is never released automatically, and never read).
    blocked: list[tuple[Path, str]] = field(default_factory=list)

    def problems(self) -> list[tuple[Path, str]]:
        """Every entry that is not a case to dispatch, and why (``status``'s ``invalid``)."""
        return [*self.invalid, *self.expired_invalid, *self.blocked]


def _present(path: Path) -> bool:
    """Whether any entry is at ``path``, without following a link (a dangling link counts)."""
    try:
        os.lstat(path)
    except FileNotFoundError:
        return False
    return True


def is_halted(outgoing: Path) -> bool:
    return _present(outgoing / HALT)


def halt(outgoing: Path) -> None:
    """Create ``HALT``; a link or anything but a file there is replaced, never followed."""
    try:
        ensure_marker(outgoing / HALT)
    except OSError:
        replace_file(outgoing / HALT, b"")


def unhalt(outgoing: Path) -> None:
    (outgoing / HALT).unlink(missing_ok=True)  # unlink removes a link itself


def scan_outgoing(
    outgoing: Path,
    *,
    rule_priorities: Mapping[str, str],
    invalid_grace: float,
    now: float | None = None,
) -> Scan:
    """Classify every entry of ``outgoing`` (mercure's readiness rules, §1.2 of the reference).

    ``invalid`` folders (unreadable task.json, ``dispatch: {}``, no task.json) stay where they are
    until nothing in them has changed for ``invalid_grace`` seconds; then they are listed in
    ``expired_invalid`` for the caller to quarantine.
    """
    now = time.time() if now is None else now
    scan = Scan(halted=is_halted(outgoing))
    try:
        entries = list(os.scandir(outgoing))
    except FileNotFoundError:
        return scan
    seen: set[Path] = set()
    for entry in entries:
        path = Path(entry.path)
        try:
            if entry.is_dir(follow_symlinks=False):
                _classify(scan, path, seen, rule_priorities, invalid_grace, now)
        except FileNotFoundError:
            continue  # vanished or renamed since the listing: the next scan sees it anew
        except OSError as exc:
            if _present(path):
                scan.blocked.append((path, f"{path.name} cannot be looked at: {exc}"))
    for gone in _parsed.keys() - seen:
        _parsed.pop(gone, None)
    return scan


def _classify(
    scan: Scan,
    path: Path,
    seen: set[Path],
    rule_priorities: Mapping[str, str],
    invalid_grace: float,
    now: float,
) -> None:
    """Put one case folder in its list of ``scan``. Markers are looked at with ``lstat`` only:
    nothing planted under their names is ever opened here."""
    blocked = _access_problem(path) or _odd_claim(path)
    if blocked:
        scan.blocked.append((path, blocked))
        return
    if _present(path / PROCESSING):
        scan.claimed.append(path)
        return
    if _present(path / LOCK) or _present(path / ERROR):
        scan.busy.append(path)
        return
    try:
        task = _read_task_cached(path, seen)
        if task.dispatch is None:
            raise TaskFileError("task.json has an empty dispatch section: nothing to send")
    except TaskFileError as exc:
        if not _present(path):
            return  # moved away (sent, or taken by another dispatcher) since the listing
        reason = str(exc)
        if now - _last_change(path) >= invalid_grace:
            scan.expired_invalid.append((path, reason))
        else:
            scan.invalid.append((path, reason))
        return
    cand = Candidate(path, task, case_priority(task, rule_priorities), _mtime(path))
    due_at = task.dispatch.next_retry_at or 0
    (scan.ready if now >= due_at else scan.not_due).append(cand)


def _access_problem(path: Path) -> str | None:
    """Why the service cannot claim or move the folder (it cannot list, enter or write it)."""
    if os.access(path, os.R_OK | os.W_OK | os.X_OK):
        return None
    info = os.lstat(path)
    can = "read" if not os.access(path, os.R_OK | os.X_OK) else "write"
    user = _service_user()
    return (
        f"the service user {user} cannot {can} the folder {path.name} (owner uid "
        f"{info.st_uid}, mode {stat.S_IMODE(info.st_mode):03o}); it stays where it is: "
        f"give it to {user} (chown -R {user} '{path}') or make it readable and writable "
        "(chmod u+rwx)"
    )


def _service_user() -> str:
    try:
        return pwd.getpwuid(os.geteuid()).pw_name
    except KeyError:
        return f"uid {os.geteuid()}"


def _odd_claim(path: Path) -> str | None:
    """Why ``.processing`` is not a claim of a dispatcher: a link, FIFO, device, or too large."""
    try:
        info = os.lstat(path / PROCESSING)
    except FileNotFoundError:
        return None
    if stat.S_ISLNK(info.st_mode):
        what = "a symbolic link"
    elif not stat.S_ISREG(info.st_mode):
        what = "not a regular file"
    elif info.st_size > MAX_CLAIM_BYTES:
        what = f"larger than {MAX_CLAIM_BYTES // 2**10} KiB"
    else:
        return None
    return (
        f"{PROCESSING} in {path.name} is {what}: taken for a foreign claim, never released "
        "automatically; remove it once nothing works on the case"
    )


#: Parsed task.json per case folder, valid while the file is unchanged (same inode, change
#: time, mtime and size): a backlog of hundreds of cases is scanned every second, and validation
#: dominates the scan. A refusal is remembered too, so a bad file is read once, not per scan.
_parsed: dict[Path, tuple[tuple[int, ...], Task | TaskFileError]] = {}


def _read_task_cached(path: Path, seen: set[Path]) -> Task:
    try:
        st = os.lstat(path / TASKFILE)
    except FileNotFoundError:
        raise TaskFileError(f"{TASKFILE} is missing") from None
    key = (st.st_ino, st.st_ctime_ns, st.st_mtime_ns, st.st_size)
    hit = _parsed.get(path)
    seen.add(path)
    if hit is None or hit[0] != key:
        try:
            hit = (key, read_task(path)[1])
        except TaskFileError as exc:
            hit = (key, exc)
        _parsed[path] = hit
    if isinstance(hit[1], TaskFileError):
        raise TaskFileError(str(hit[1]))
    return hit[1]


def _mtime(path: Path) -> float:
    try:
        return os.lstat(path).st_mtime
    except OSError:
        return 0.0


def _last_change(path: Path) -> float:
    return max(_mtime(path), _mtime(path / TASKFILE))


def order_cases(cands: Iterable[Candidate], *, offpeak_now: bool) -> list[Candidate]:
    """Urgent and normal cases interleaved 2:1, each list oldest (folder mtime) first.

    Off-peak cases join the normal list inside the window and wait outside it. When one list is
    empty the other continues (mercure aborted the cycle there: a quirk fixed here).
    """
    urgent: list[Candidate] = []
    normal: list[Candidate] = []
    for cand in cands:
        if cand.priority == "urgent":
            urgent.append(cand)
        elif cand.priority == "normal" or offpeak_now:
            normal.append(cand)
    urgent.sort(key=lambda c: c.mtime)
    normal.sort(key=lambda c: c.mtime)
    ordered: list[Candidate] = []
    counter = 0
    while urgent or normal:
        take_urgent = (counter % 3 < 2 and urgent) or not normal
        ordered.append((urgent if take_urgent else normal).pop(0))
        counter += 1
    return ordered


# ---------------------------------------------------------------------------------------------
# claims


# Claims live in tasks/claims.py (their content and heartbeat); re-exported here.


# ---------------------------------------------------------------------------------------------
# per-target status and retries


def reset_status_if_mismatched(case_dir: Path, targets: list[str]) -> dict[str, Any]:
    """mercure resets every target to "waiting" when the status does not match the targets.

    mercure compared only the counts and then crashed on a renamed target (KeyError, case stuck);
    here the *names* are compared.
    """

    def change(raw: dict[str, Any]) -> None:
        dispatch = raw.setdefault("dispatch", {})
        status = dispatch.get("status") or {}
        if set(status) != set(targets):
            stamp = now_str()
            dispatch["status"] = {t: {"state": "waiting", "time": stamp} for t in targets}

    return update_task(case_dir, change)


def set_target_status(case_dir: Path, target: str, state: str, message: str | None = None) -> None:
    """Record one target's outcome; ``message`` (our extra key) says why it failed."""

    def change(raw: dict[str, Any]) -> None:
        status = raw.setdefault("dispatch", {}).setdefault("status", {})
        entry: dict[str, Any] = {"state": state, "time": now_str()}
        if message:
            entry["message"] = message
        earlier = status.get(target)
        if isinstance(earlier, dict) and "storage_commitment" in earlier:
            entry["storage_commitment"] = earlier["storage_commitment"]  # the send recorded it
        status[target] = entry

    update_task(case_dir, change)


def record_failed_attempt(
    case_dir: Path, retry_max: int, retry_delay: float, now: float | None = None
) -> bool:
    """mercure's ``increase_retry``: True = retry later (written), False = attempts exhausted.

    ``retries`` counts failed attempts; when the new count reaches ``retry_max`` nothing is
    written and the case goes to error, so a case makes ``max(retry_max, 1)`` attempts.
    """
    now = time.time() if now is None else now
    retries = (read_task_raw(case_dir).get("dispatch", {}).get("retries") or 0) + 1
    if retries >= retry_max:
        return False

    def change(raw: dict[str, Any]) -> None:
        raw["dispatch"]["retries"] = retries
        raw["dispatch"]["next_retry_at"] = now + retry_delay

    update_task(case_dir, change)
    return True


# ---------------------------------------------------------------------------------------------
# moves


def move_case(
    case_dir: Path,
    dest_root: Path,
    *,
    fail_stage: str | None = None,
    reason: str | None = None,
) -> Path:
    """Move a case folder into ``dest_root`` (``<name>_<isoformat>`` on collision).

    With ``fail_stage`` the moved ``task.json`` gets ``info.fail_stage`` (a plain string, as
    mercure's quirk did not manage) and ``info.fail_reason``; a ``reason`` is also written as a
    readable ``dispatch_error.txt``. The claim marker is removed last.
    """
    dest_root.mkdir(parents=True, exist_ok=True)
    dest = dest_root / case_dir.name
    if dest.exists():
        dest = dest_root / f"{case_dir.name}_{dt.datetime.now().isoformat()}"
    try:
        os.rename(case_dir, dest)
    except OSError as exc:
        if exc.errno != errno.EXDEV:
            raise
        _move_across_devices(case_dir, dest)
    if reason:
        replace_file(dest / REASON_FILE, (reason.rstrip() + "\n").encode("utf-8"))
    if fail_stage:
        with contextlib.suppress(TaskFileError):
            update_task(dest, lambda raw: _set_fail(raw, fail_stage, reason))
    release_claim(dest)
    return dest


def _move_across_devices(case_dir: Path, dest: Path) -> None:
    """Copy to a hidden temporary name beside ``dest``, rename it into place once complete,
    then remove the original: ``dest`` never holds half a case, and a failed copy leaves the
    case where it was. Links inside the case are copied as links, never followed; files are
    read no-follow (``tasks.safefiles.read_regular``'s flags), and FIFOs and devices, which
    hold no data of the case, are left out."""
    tmp = dest.with_name(f".{dest.name}.{secrets.token_hex(8)}.moving")
    try:
        shutil.copytree(case_dir, tmp, symlinks=True, copy_function=_copy_regular)
        os.rename(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    shutil.rmtree(case_dir)


def _copy_regular(src: str, dst: str) -> None:
    try:
        copy_regular(Path(src), Path(dst))
    except OSError as exc:
        if exc.errno != errno.EINVAL:
            raise
        LOGGER.warning("moving a case: %s, left out", src)


def _set_fail(raw: dict[str, Any], stage: str, reason: str | None) -> None:
    info = raw.get("info")
    if isinstance(info, dict):
        info["fail_stage"] = stage
        if reason:
            info["fail_reason"] = reason


def restart_case(case_dir: Path, outgoing: Path) -> Path:
    """mercure's ``restart_dispatch``: send a case from error/ (or success/) again.

    Retries, ``next_retry_at`` and ``fail_stage`` are reset; targets already complete stay
    complete, so only the unfinished ones are sent. Guarded by ``.lock`` while it moves.
    """
    for marker in (LOCK, ERROR, PROCESSING):
        if (case_dir / marker).exists():
            raise TaskFileError(f"cannot restart {case_dir.name}: it has a {marker} marker")
    raw = read_task_raw(case_dir)
    info = raw.get("info")
    action = info.get("action") if isinstance(info, dict) else None
    if action not in (None, "route", "both"):
        raise TaskFileError(f"cannot restart {case_dir.name}: action {action!r} is not routed")
    dispatch = raw.get("dispatch")
    if not isinstance(dispatch, dict) or "status" not in dispatch:
        # mercure's "no_dispatch_status"; checked before the .lock so a refusal leaves none behind
        raise TaskFileError(f"cannot restart {case_dir.name}: task.json has no dispatch status")
    dest = outgoing / case_dir.name
    if dest.exists():
        raise TaskFileError(f"cannot restart {case_dir.name}: {dest} already exists")
    ensure_marker(case_dir / LOCK)

    def change(raw: dict[str, Any]) -> None:
        dispatch = raw.setdefault("dispatch", {})
        dispatch["retries"] = None
        dispatch["next_retry_at"] = None
        info = raw.get("info")
        if isinstance(info, dict):
            if "fail_stage" in info:
                info["fail_stage"] = None
            info.pop("fail_reason", None)

    update_task(case_dir, change)
    (case_dir / REASON_FILE).unlink(missing_ok=True)
    shutil.move(str(case_dir), str(dest))
    (dest / LOCK).unlink(missing_ok=True)
    return dest


def case_targets(case_dir: Path) -> list[str]:
    """Target names of a case (empty when task.json cannot be read)."""
    try:
        return target_names(read_task(case_dir)[1])
    except TaskFileError:
        return []
