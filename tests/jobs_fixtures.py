"""Job functions for the background-job tests (importable by the executor's job processes).

The session registers them as jobs in ``DICOM_DISPATCH_JOBS`` (``tests/conftest.py``), as a site
does; :func:`unregistered` is deliberately left out. Each job records what it saw in a JSON file
under ``out`` named after ``name``: its start and end times (``time.time()``), its pid, and
anything else a test wants to check.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Any

from prefect import flow

from flows.background import (
    get_current_task,
    get_or_generate_task_uuid,
    record_task_error_exit,
    record_task_info,
)


def _write(out: str, name: str, data: dict[str, Any]) -> None:
    path = Path(out) / f"{name}.json"
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data))
    os.replace(tmp, path)


def timed(out: str, name: str, task_type: str, seconds: float) -> None:
    """Sleep ``seconds``; record start and end."""
    start = time.time()
    _write(out, f"{name}.start", {"start": start, "pid": os.getpid()})
    time.sleep(seconds)
    _write(out, name, {"type": task_type, "start": start, "end": time.time(), "pid": os.getpid()})


def wait_for_file(out: str, name: str, flag: str, timeout: float = 120.0) -> None:
    """Run until the file ``flag`` exists (or ``timeout``); record start, pid and end."""
    start = time.time()
    _write(out, f"{name}.start", {"start": start, "pid": os.getpid()})
    deadline = time.monotonic() + timeout
    while not Path(flag).exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    _write(out, name, {"start": start, "end": time.time(), "pid": os.getpid()})


def report_identity(out: str, name: str) -> str:
    """Record the task id seen from inside, set an info message, return normally."""
    task = get_current_task()
    record_task_info("half way")
    record_task_info("**done** reading")
    _write(
        out,
        name,
        {
            "current": task.uuid if task else None,
            "current_type": task.task_type if task else None,
            "generated": get_or_generate_task_uuid(),
            "pid": os.getpid(),
        },
    )
    return "ignored"


def error_exit(out: str, name: str, message: str) -> None:
    """OpenREM's pattern: record the error, then return normally."""
    record_task_error_exit(message)
    _write(out, name, {"current_after_error": get_current_task() is not None})


def unregistered(path: str) -> None:
    """Not registered as a job: the executor must refuse it (it would write ``path``)."""
    Path(path).write_text("ran")


def boom(message: str) -> None:
    raise ValueError(message)


def exit_with(code: int) -> None:
    sys.exit(code)


def quick() -> None:
    """A 10 ms job (benchmark)."""
    time.sleep(0.01)


@flow(name="bench_runner_job")
async def runner_job(out: str, name: str, seconds: float) -> None:
    """The same job as a plain flow, for the benchmark's Runner + deployment-limit baseline."""
    timed(out, name, "runner", seconds)
