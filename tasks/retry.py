"""The quick retries of every task that talks to a peer: transient failures only, soon.

A send or a retrieve that failed because the peer was briefly away (timeout, refused, abort) is
worth another go within seconds; one the peer refused (rejected association, unknown accession,
bad credentials) fails the same way again, so the task fails at once and the slower retries of
the folder protocol or of the batch decide what happens next.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from prefect import Task
from prefect.client.schemas.objects import State, TaskRun

from blocks.errors import TransientTargetError

__all__ = ["quick_retries", "transient_only"]


def transient_only(task: Task[Any, Any], task_run: TaskRun, state: State[Any]) -> bool:
    """Prefect's ``retry_condition_fn``: retry only a :class:`TransientTargetError`."""
    return isinstance(state.data, TransientTargetError)


def quick_retries(delays: Sequence[float]) -> dict[str, Any]:
    """``Task.with_options`` arguments for one retry after each of ``delays`` seconds."""
    return {"retries": len(delays), "retry_delay_seconds": list(delays) or 0}
