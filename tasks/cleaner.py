"""Retention of sent cases: which success/ cases to remove, and removing them (mercure's cleaner).

mercure's ``app/cleaner.py`` rules, kept: a case's age is its folder's mtime; a case older than
``retention`` is removed only inside the off-peak window; when the volume holding success/ is
fuller than ``emergency_clean_percentage`` an emergency clean runs at any hour. Deliberate
differences: the emergency clean removes the oldest cases only until the volume is back under the
threshold (mercure empties the whole folder), and only success/ is ever cleaned — error/ holds
cases a person must look at, outgoing/ the queue. A folder that is a symlink or still holds a
claim or lock marker is left alone.

No Prefect: the service's periodic task and the tests call it directly.
"""

from __future__ import annotations

import errno
import logging
import os
import shutil
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from tasks.oncelog import OnceLog
from tasks.taskjson import TaskFileError, read_task_raw

__all__ = [
    "CleanReport",
    "DiskUsage",
    "SentCase",
    "clean_success",
    "emergency_plan",
    "regular_plan",
    "scan_sent",
]

LOGGER = logging.getLogger(__name__)
#: What was said about entries the cleaner cannot handle (each once, until it goes away).
_SAID = OnceLog(LOGGER)
#: Markers that say someone is still working on the folder.
BUSY_MARKERS = (".processing", ".lock")


@dataclass(frozen=True)
class SentCase:
    """A case folder in success/: its age (folder mtime, as mercure) and its size on disk."""

    path: Path
    mtime: float
    size: int


@dataclass(frozen=True)
class DiskUsage:
    total: int
    used: int


@dataclass
class CleanReport:
    removed: list[str] = field(default_factory=list)  # case ids
    freed: int = 0
    emergency: bool = False


def regular_plan(cases: Iterable[SentCase], now: float, retention: float) -> list[SentCase]:
    """Cases older than ``retention`` (strictly, as mercure), oldest first."""
    return sorted((c for c in cases if now - c.mtime > retention), key=lambda c: c.mtime)


def emergency_plan(
    cases: Iterable[SentCase], usage: DiskUsage, percentage: float
) -> list[SentCase]:
    """The oldest cases whose removal brings ``usage`` to ``percentage`` % of the volume or less.

    mercure's trigger: ``used - total * percentage / 100`` bytes to clear; nothing when that is
    not positive. When all of success/ is not enough (error/ or other data fill the volume),
    every case is in the plan.
    """
    to_clear = usage.used - usage.total * percentage / 100
    plan: list[SentCase] = []
    for case in sorted(cases, key=lambda c: c.mtime):
        if to_clear <= 0:
            break
        plan.append(case)
        to_clear -= case.size
    return plan


def scan_sent(success: Path) -> list[SentCase]:
    """Every removable case folder directly in ``success``.

    One entry that cannot be looked at (a folder the service cannot read) is skipped, and
    logged once: it never ends the pass. Markers are looked at without following a link.
    """
    found: list[SentCase] = []
    try:
        entries = list(os.scandir(success))
    except FileNotFoundError:
        return found
    for entry in entries:
        path = Path(entry.path)
        try:
            if entry.is_symlink() or not entry.is_dir(follow_symlinks=False):
                continue
            if any(os.path.lexists(path / marker) for marker in BUSY_MARKERS):
                continue
            if not os.access(path, os.R_OK | os.W_OK | os.X_OK):
                raise PermissionError(errno.EACCES, "the service user cannot read or write it")
            found.append(SentCase(path, entry.stat(follow_symlinks=False).st_mtime, _du(path)))
        except FileNotFoundError:  # removed meanwhile (another cleaner)
            continue
        except OSError as exc:
            _SAID.log(logging.WARNING, path, "scan", "cleaner skips %s: %s", path, exc)
    _SAID.forget_gone()
    return found


def clean_success(
    success: Path,
    *,
    retention: float,
    emergency_percentage: float,
    offpeak_now: bool,
    now: float,
    usage: Callable[[Path], DiskUsage] | None = None,
    protected: Sequence[Path] = (),
) -> CleanReport:
    """One cleaner pass over ``success``: the emergency clean if due, then the off-peak clean.
    Nothing that is or holds a ``protected`` folder (outgoing/, error/) is removed."""
    measure = usage or _disk_usage
    report = CleanReport()
    if not success.is_dir():
        return report
    cases = scan_sent(success)
    before = measure(success)
    urgent = emergency_plan(cases, before, emergency_percentage)
    if urgent:
        report.emergency = True
        LOGGER.warning(
            "disk almost full (%d of %d bytes used, over %g %%): emergency clean of %s",
            before.used,
            before.total,
            emergency_percentage,
            success,
        )
        _remove_all(urgent, "emergency clean", report, success, protected)
        gone = {c.path for c in urgent}
        cases = [c for c in cases if c.path not in gone]
        after = measure(success)
        if after.used > after.total * emergency_percentage / 100:
            LOGGER.warning(
                "still %d of %d bytes used after the emergency clean of %s: "
                "the rest is not in success/",
                after.used,
                after.total,
                success,
            )
    if offpeak_now:
        _remove_all(regular_plan(cases, now, retention), "retention", report, success, protected)
    return report


def _remove_all(
    cases: list[SentCase],
    why: str,
    report: CleanReport,
    success: Path,
    protected: Sequence[Path],
) -> None:
    for case in cases:
        case_id = _case_id(case.path)
        try:
            _check_removable(case.path, success, protected)
            shutil.rmtree(case.path)
        except FileNotFoundError:
            continue
        except OSError as exc:
            LOGGER.error("could not remove case %s (%s): %s", case_id, case.path, exc)
            continue
        report.removed.append(case_id)
        report.freed += case.size
        LOGGER.info("removed case %s (%s, %s, %d bytes)", case_id, case.path, why, case.size)


def _check_removable(path: Path, success: Path, protected: Sequence[Path]) -> None:
    """``OSError`` unless ``path`` is a folder directly in success/ (links resolved) that neither
    is nor holds a ``protected`` folder: the last check before a removal, whatever the layout."""
    real, home = path.resolve(), success.resolve()
    if path.is_symlink() or real.parent != home:
        raise OSError(f"{path} is not a folder directly in {home}; not removed")
    for folder in protected:
        if folder.resolve().is_relative_to(real):
            raise OSError(f"{path} is or holds {folder}; not removed")


def _case_id(path: Path) -> str:
    """task.json's id, else the folder's name (mercure's folders are named by it)."""
    try:
        value = read_task_raw(path).get("id")
    except (TaskFileError, OSError):
        value = None
    return str(value) if value else path.name


def _du(path: Path) -> int:
    """Bytes the folder occupies (allocated blocks, what a removal gives back)."""
    total = 0
    for root, dirs, files in os.walk(path):
        for name in (*files, *dirs):
            try:
                total += os.lstat(os.path.join(root, name)).st_blocks * 512
            except FileNotFoundError:
                continue
    return total


def _disk_usage(path: Path) -> DiskUsage:
    total, used, _free = shutil.disk_usage(path)
    return DiskUsage(total, used)
