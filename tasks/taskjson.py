"""mercure's ``task.json``: validation, and atomic read-modify-write that keeps every key.

The file is the contract with mercure's router and processor, its web UI and users' scripts, so it
is edited as a plain dict (unknown keys, top-level or nested, survive every rewrite) and only
*validated* through the pydantic models below. Writes go to a temporary file in the same folder
and are renamed over ``task.json``, so a crash never leaves half a file; the temporary name is
random and created exclusively, and ``task.json`` is read without following a link
(``tasks.safefiles``). This module has no Prefect dependency.
"""

from __future__ import annotations

import errno
import itertools
import json
import operator
import re
import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, ValidationError, field_validator

from blocks.errors import CaseError
from tasks.safefiles import read_regular, replace_file

__all__ = [
    "MAX_TASKFILE_BYTES",
    "MAX_TASK_DEPTH",
    "TASKFILE",
    "Task",
    "TaskDispatch",
    "TaskDispatchStatus",
    "TaskFileError",
    "TaskInfo",
    "new_task",
    "now_str",
    "parse_task",
    "read_task",
    "read_task_raw",
    "target_names",
    "update_task",
    "write_task",
]

TASKFILE = "task.json"
#: mercure's task.json is a few KiB; anything this large was not written by a router.
MAX_TASKFILE_BYTES = 16 * 2**20
#: mercure nests four levels; keys of its processing modules a few more.
MAX_TASK_DEPTH = 64
TMP_PREFIX = ".task.json."
TMP_SUFFIX = ".tmp"

FailStage = Literal["DISPATCHING", "PROCESSING", "ROUTING"]
DispatchState = Literal["waiting", "complete", "error"]


class TaskFileError(CaseError):
    """``task.json`` is missing, not JSON, or does not follow mercure's schema."""


class _Model(BaseModel):
    # Keys we don't know are accepted (architecture §4.1); they live on in the raw dict we rewrite.
    model_config = ConfigDict(extra="allow")


class TaskInfo(_Model):
    action: Literal["route", "both", "process", "discard", "notification"]
    uid: str
    uid_type: Literal["series", "study"]
    triggered_rules: dict[str, Any] | str
    applied_rule: str | None = None
    patient_name: str | None = None
    mrn: str
    acc: str
    sender_address: str = "MISSING"
    mercure_version: str
    mercure_appliance: str
    mercure_server: str
    device_serial_number: str | None = None
    fail_stage: FailStage | None = None
    sender_aet: str = "MISSING"
    receiver_aet: str = "MISSING"


class TaskDispatchStatus(_Model):
    state: DispatchState
    time: str


class TaskDispatch(_Model):
    target_name: str | list[str]
    status: dict[str, TaskDispatchStatus] = {}
    retries: int | None = 0
    next_retry_at: float | None = 0
    series_uid: str | None = None


class Task(_Model):
    info: TaskInfo
    id: str
    dispatch: TaskDispatch | None = None
    process: Any = None
    study: Any = None
    nomad_info: Any = None

    @field_validator("dispatch", mode="before")
    @classmethod
    def _empty_dispatch(cls, value: Any) -> Any:
        # mercure writes ``{}`` for "nothing to dispatch"; keep that distinguishable from a section.
        return None if value in ({}, None) else value


def target_names(task: Task) -> list[str]:
    """The targets of a task as a list (mercure accepts a plain string for one target)."""
    if task.dispatch is None:
        return []
    names = task.dispatch.target_name
    return [names] if isinstance(names, str) else list(names)


def now_str(now: float | None = None) -> str:
    """mercure's timestamp format for status entries: local time, seconds."""
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(now))


def new_task(case_id: str, targets: list[str] | str, **info: Any) -> dict[str, Any]:
    """A new task.json dict with every field mercure's router writes; ``info`` overrides.

    Used for the cases we create ourselves (retrieve into outgoing), so they are shaped exactly
    like the router's and pass the same validation.
    """
    names = [targets] if isinstance(targets, str) else list(targets)
    stamp = now_str()
    return {
        "info": {
            "action": "route",
            "uid": "",
            "uid_type": "series",
            "triggered_rules": {},
            "applied_rule": "",
            "patient_name": None,
            "mrn": "MISSING",
            "acc": "",
            "sender_address": "MISSING",
            "mercure_version": "dicom-dispatch",
            "mercure_appliance": "dicom-dispatch",
            "mercure_server": socket.gethostname(),
            "device_serial_number": None,
            "fail_stage": None,
            "sender_aet": "MISSING",
            "receiver_aet": "MISSING",
            **info,
        },
        "id": case_id,
        "dispatch": {
            "target_name": targets,
            "status": {t: {"state": "waiting", "time": stamp} for t in names},
            "retries": None,
            "next_retry_at": None,
            "series_uid": None,
        },
        "process": {},
        "study": {},
        "nomad_info": None,
    }


def read_task_raw(case_dir: Path) -> dict[str, Any]:
    """The parsed JSON of ``task.json`` (a dict), or :class:`TaskFileError` saying why not.

    Whatever was planted under the name costs only its case: a link, FIFO or device is never
    followed, waited on or read; more than ``MAX_TASKFILE_BYTES``, text that is not UTF-8 and
    nesting deeper than ``MAX_TASK_DEPTH`` are refused before the JSON parser sees them.
    """
    path = case_dir / TASKFILE
    try:
        data = read_regular(path, MAX_TASKFILE_BYTES)
    except FileNotFoundError:
        raise TaskFileError(f"{path.name} is missing") from None
    except OSError as exc:
        raise TaskFileError(_unreadable(path, exc)) from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise TaskFileError(f"{path.name} is not UTF-8 text: {exc}") from None
    too_deep = f"{path.name} is nested deeper than {MAX_TASK_DEPTH} levels"
    if _nested_deeper_than(text, MAX_TASK_DEPTH):
        raise TaskFileError(too_deep)
    try:
        raw = json.loads(text)
    except RecursionError:  # pragma: no cover - the depth check comes first
        raise TaskFileError(too_deep) from None
    except ValueError as exc:
        raise TaskFileError(f"{path.name} is not valid JSON: {exc}") from None
    if not isinstance(raw, dict):
        raise TaskFileError(f"{path.name} must hold a JSON object")
    return raw


def _unreadable(path: Path, exc: OSError) -> str:
    if exc.errno == errno.ELOOP:
        return f"{path.name} is a symbolic link, not a file"
    if exc.errno == errno.EINVAL:
        return f"{path.name} is not a regular file (a FIFO, device or folder)"
    if exc.errno == errno.EFBIG:
        return f"{path.name} is larger than {MAX_TASKFILE_BYTES // 2**20} MiB"
    return f"{path.name} cannot be read: {exc.strerror}"


#: JSON strings (their brackets do not nest), and everything that is not a bracket.
_JSON_STRING = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"', re.DOTALL)
_NOT_BRACKET = re.compile(r"[^\[\]{}]+")
#: Opening brackets count 2, closing 0: the running sum minus the count is the depth.
_BRACKET_WEIGHT = bytes.maketrans(b"[{]}", b"\x02\x02\x00\x00")


def _nested_deeper_than(text: str, limit: int) -> bool:
    """Whether the JSON ``text`` nests arrays/objects deeper than ``limit``, in linear time and
    without recursion (the parser's own guard is a ``RecursionError`` near the stack's end)."""
    if text.count("[") + text.count("{") <= limit:
        return False
    brackets = _NOT_BRACKET.sub("", _JSON_STRING.sub("", text)).encode("ascii")
    weights = brackets.translate(_BRACKET_WEIGHT)
    depths = map(operator.sub, itertools.accumulate(weights), itertools.count(1))
    return max(depths, default=0) > limit


def parse_task(raw: dict[str, Any]) -> Task:
    """Validate a raw task dict against mercure's schema; the error names the first bad field."""
    try:
        return Task.model_validate(raw)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "task"
        raise TaskFileError(
            f"task.json has invalid format: {where}: {first['msg']} ({exc.error_count()} error(s))"
        ) from None


def read_task(case_dir: Path) -> tuple[dict[str, Any], Task]:
    """Read and validate ``task.json``: the raw dict (to edit) and the typed view (to decide)."""
    raw = read_task_raw(case_dir)
    return raw, parse_task(raw)


def write_task(case_dir: Path, raw: dict[str, Any]) -> None:
    """Replace ``task.json`` atomically (a new random temp file beside it, fsync, rename)."""
    replace_file(case_dir / TASKFILE, json.dumps(raw).encode("utf-8"), fsync=True)


_update_lock = threading.Lock()


def update_task(case_dir: Path, change: Callable[[dict[str, Any]], None]) -> dict[str, Any]:
    """Re-read ``task.json``, apply ``change`` to the dict, write it back atomically.

    Re-reading (as mercure does) keeps edits made by others since our last read; the lock
    serialises the concurrent per-target status writes of one process.
    """
    with _update_lock:
        raw = read_task_raw(case_dir)
        change(raw)
        write_task(case_dir, raw)
        return raw
