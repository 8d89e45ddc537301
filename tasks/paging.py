"""Every item of a Prefect list endpoint, read one page at a time.

The server returns at most ``limit`` items a call, so the flows and the service page through
flow runs, automations and concurrency limits alike; the loop and its stopping rule (a short
page is the last) are written once here. Prefect-free: the caller hands in the read.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import TypeVar

__all__ = ["PAGE", "read_all"]

#: Items asked for in one call (Prefect's own default page size).
PAGE = 200

T = TypeVar("T")


async def read_all(read_page: Callable[[int, int], Awaitable[list[T]]]) -> list[T]:
    """All that ``read_page(limit, offset)`` returns, called with ``offset`` 0, ``PAGE``, ...
    until a page holds fewer than ``PAGE`` items."""
    found: list[T] = []
    while True:
        page = await read_page(PAGE, len(found))
        found.extend(page)
        if len(page) < PAGE:
            return found
