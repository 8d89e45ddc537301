"""Local admission: never start more sends than a tag's limit allows, before asking Prefect.

Prefect's tag limits are the authority across processes and hosts, but a refused slot (HTTP 423)
costs a Retry-After back-off of about 0.3 s per hand-over. Admitting work locally first means the
server's limit is seldom the one that says no (architecture §5). Waiters are served first come,
first served, which Prefect's own back-off does not promise.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Iterable

__all__ = ["LocalAdmission", "shared_admission"]


class LocalAdmission:
    """One semaphore per limited tag; a tag without a limit (None or 0) is not limited."""

    def __init__(self) -> None:
        self._limits: dict[str, int] = {}
        self._semaphores: dict[str, asyncio.Semaphore] = {}

    def set_limit(self, tag: str, limit: int | None) -> None:
        limit = limit or 0
        if self._limits.get(tag, 0) != limit:
            self._limits[tag] = limit
            self._semaphores.pop(tag, None)  # a new limit applies to new holders

    def _semaphore(self, tag: str) -> asyncio.Semaphore | None:
        limit = self._limits.get(tag, 0)
        if limit <= 0:
            return None
        sem = self._semaphores.get(tag)
        if sem is None:
            sem = self._semaphores[tag] = asyncio.Semaphore(limit)
        return sem

    @contextlib.asynccontextmanager
    async def admit(self, tags: Iterable[str]) -> AsyncIterator[None]:
        """Hold a local slot of every limited tag (taken in sorted order: no deadlock)."""
        async with contextlib.AsyncExitStack() as stack:
            for tag in sorted(set(tags)):
                sem = self._semaphore(tag)
                if sem is not None:
                    await stack.enter_async_context(sem)
            yield


_shared = LocalAdmission()


def shared_admission() -> LocalAdmission:
    """The admission shared by every case this process dispatches.

    Reached through a function (not a module global of the flow's module) because Prefect
    pickles a served flow's function by value, globals included.
    """
    return _shared
