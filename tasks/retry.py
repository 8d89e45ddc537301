"""The quick retries of every task that talks to a peer: transient failures only, soon.

A send or a retrieve that failed because the peer was briefly away (timeout, refused, abort) is
worth another go within seconds; one the peer refused (rejected association, unknown accession,
bad credentials) fails the same way again, so the task fails at once and the slower retries of
the folder protocol or of the batch decide what happens next.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, ParamSpec, TypeVar

from prefect import Task, task
from prefect.cache_policies import NO_CACHE
from prefect.client.schemas.objects import State, TaskRun

from blocks.errors import TransientTargetError
from blocks.settings import DEFAULT_QUICK_RETRY_DELAYS

__all__ = ["peer_task", "quick_retries", "transient_only"]

P = ParamSpec("P")
R = TypeVar("R")


def transient_only(task: Task[Any, Any], task_run: TaskRun, state: State[Any]) -> bool:
    """Prefect's ``retry_condition_fn``: retry only a :class:`TransientTargetError`."""
    return isinstance(state.data, TransientTargetError)


def quick_retries(delays: Sequence[float]) -> dict[str, Any]:
    """``Task.with_options`` arguments for one retry after each of ``delays`` seconds."""
    return {"retries": len(delays), "retry_delay_seconds": list(delays) or 0}


def peer_task(
    name: str, task_run_name: str | None = None
) -> Callable[[Callable[P, R]], Task[P, R]]:
    """``@task`` for a step that talks to a peer: quick retries of transient errors only (the
    caller applies ``DispatcherSettings.quick_retry_delays`` with :func:`quick_retries`), and
    nothing cached or persisted (the results are small, the inputs name folders that change).
    """
    return task(
        name=name,
        task_run_name=task_run_name,
        retries=len(DEFAULT_QUICK_RETRY_DELAYS),
        retry_delay_seconds=list(DEFAULT_QUICK_RETRY_DELAYS),
        retry_condition_fn=transient_only,
        cache_policy=NO_CACHE,
        persist_result=False,
    )
