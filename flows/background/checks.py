"""What a job request must be before anything is queued; anything else is a ``JobRefusedError``.

A job runs in another process, maybe on another host, long after the call: its function must be
importable there by name and its arguments must survive the trip through the run's parameters
(JSON) unchanged. Refusing at the call is the only moment the caller can still be told.

Which functions may run at all is the executor's decision (:func:`refused_func`, against the
functions registered as jobs on its host, ``flows.background.registered``): anyone who can
create a run on the API can name any ``func``, so the executor checks every run before its
process imports anything. The caller checks its own host's registry first, only for an early,
clear error.
"""

from __future__ import annotations

import importlib
import json
import re
from collections.abc import Mapping, Sequence
from typing import Any

from blocks.errors import JobRefusedError
from flows.background.registered import JobRegistry

__all__ = [
    "check_allowed",
    "check_limits",
    "check_priority",
    "check_type",
    "func_ref",
    "json_checked",
    "refused_func",
]

_TASK_TYPE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:-]{0,99}$")
_IDENTIFIER = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def func_ref(func: Any) -> str:
    """``module:name`` of a top-level function the job's process can import, or refuse."""
    if isinstance(func, str):
        return _checked_ref(func)
    if not callable(func):
        raise JobRefusedError(f"func must be a function or 'module:function', not {func!r}")
    owner: str | None = getattr(func, "__module__", None)
    qualname = getattr(func, "__qualname__", "")
    if qualname == "<lambda>" or "<" in qualname or "." in qualname:
        raise JobRefusedError(
            f"func {qualname or func!r} is not a top-level function (a lambda, nested function "
            "or method cannot be imported by the job's process)"
        )
    if not owner or owner == "__main__":
        raise JobRefusedError(
            f"func {qualname} is defined in __main__, which the job's process cannot import; "
            "move it into a module"
        )
    ref = f"{owner}:{qualname}"
    try:
        found = getattr(importlib.import_module(owner), qualname)
    except Exception:  # noqa: BLE001
        found = None
    if found is not func:
        raise JobRefusedError(f"func {ref} cannot be imported by that name")
    return ref


def refused_func(ref: Any, registry: JobRegistry) -> str | None:
    """Why the job ``ref`` (``module:name``) may not run, or None: it must be registered as a
    job on this host and not be a program's entry point. Imports nothing."""
    return registry.refused(ref)


def check_allowed(ref: str, registry: JobRegistry) -> str:
    """``ref`` if :func:`refused_func` lets it run, else ``JobRefusedError`` with the reason."""
    reason = refused_func(ref, registry)
    if reason is not None:
        raise JobRefusedError(reason)
    return ref


def _checked_ref(func: str) -> str:
    module_name, sep, name = func.partition(":")
    if not sep or not module_name or not _IDENTIFIER.match(name):
        raise JobRefusedError(f"func {func!r} is not of the form 'module:function'")
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:  # noqa: BLE001 - any import failure means "not importable"
        raise JobRefusedError(
            f"func {func!r}: module {module_name!r} cannot be imported: {type(exc).__name__}: {exc}"
        ) from None
    if not callable(getattr(module, name, None)):
        raise JobRefusedError(f"func {func!r}: {module_name} has no function {name!r}")
    return func


def json_checked(
    args: Sequence[Any], kwargs: Mapping[str, Any]
) -> tuple[list[Any], dict[str, Any]]:
    """The arguments as the job will see them, or refuse those a JSON round trip changes."""
    plain_args, plain_kwargs = list(args), dict(kwargs)
    plain: dict[str, Any] = {"args": plain_args, "kwargs": plain_kwargs}
    try:
        text = json.dumps(plain, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise JobRefusedError(f"the job's arguments are not JSON-serialisable: {exc}") from None
    if json.loads(text) != plain:
        raise JobRefusedError(
            "the job's arguments change in a JSON round trip (tuples, non-string keys?); "
            "pass lists and string-keyed dicts"
        )
    return plain_args, plain_kwargs


def check_type(task_type: Any, what: str = "task_type") -> str:
    """A task type names a counter on the server: a short word of safe characters."""
    if not isinstance(task_type, str) or not _TASK_TYPE.match(task_type):
        raise JobRefusedError(
            f"{what} {task_type!r} must be 1-100 letters, digits, '_', '.', ':' or '-'"
        )
    return task_type


def _count(value: Any) -> bool:
    return not isinstance(value, bool) and isinstance(value, int) and value >= 0


def check_limits(num_proc: Any, num_of_task_type: Any) -> tuple[int, dict[str, int]]:
    """``num_proc`` and ``{type: n}`` as integers >= 0 (0 = no cap)."""
    if not _count(num_proc):
        raise JobRefusedError(f"num_proc must be an integer >= 0 (0 = no cap), not {num_proc!r}")
    if num_of_task_type is None:
        num_of_task_type = {}
    if not isinstance(num_of_task_type, Mapping):
        raise JobRefusedError("num_of_task_type must be a dict of task type -> limit")
    limits: dict[str, int] = {}
    for key, value in num_of_task_type.items():
        check_type(key, "num_of_task_type key")
        if not _count(value):
            raise JobRefusedError(
                f"num_of_task_type[{key!r}] must be an integer >= 0 (0 = no cap), not {value!r}"
            )
        limits[key] = value
    return num_proc, limits


def check_priority(priority: Any) -> int:
    """Any integer; higher starts first."""
    if isinstance(priority, bool) or not isinstance(priority, int):
        raise JobRefusedError(f"priority must be an integer, not {priority!r}")
    return priority
