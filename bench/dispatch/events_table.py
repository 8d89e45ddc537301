"""Prefect events of a window, by name, as the server stored them.

Counted in the server's ``events`` table rather than on the wire: clients send events over one
websocket each (no line per event anywhere), and the server emits some itself (flow-run state
changes); the table holds both, once each (the persister drops duplicate ids). The persister
writes in batches every 5 s (``PREFECT_SERVER_SERVICES_EVENT_PERSISTER_FLUSH_INTERVAL``), so a
window is read only once that long has passed after its end. Read straight from the embedded
PostgreSQL of the service's data directory (its socket, from ``postmaster.pid``).
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from datetime import UTC, datetime
from pathlib import Path

#: The persister's flush interval and a margin.
SETTLE_S = 7.0


async def _count(pgdata: Path, windows: list[tuple[float, float]]) -> list[Counter[str]]:
    import asyncpg

    lines = (pgdata / "postmaster.pid").read_text().splitlines()
    port, socket_dir = int(lines[3]), lines[4].strip()
    conn = await asyncpg.connect(host=socket_dir, port=port, user="postgres", database="postgres")
    try:
        out = []
        for start, end in windows:
            rows = await conn.fetch(
                "SELECT event, count(*) AS n FROM events"
                " WHERE occurred >= $1 AND occurred < $2 GROUP BY event",
                datetime.fromtimestamp(start, UTC),
                datetime.fromtimestamp(end, UTC),
            )
            out.append(Counter({row["event"]: int(row["n"]) for row in rows}))
        return out
    finally:
        await conn.close()


def events_in(pgdata: Path, windows: list[tuple[float, float]]) -> list[Counter[str]]:
    """Events per name that occurred in each ``(start, end)`` window (epoch seconds); waits
    until the last window's events have been written."""
    wait = max(end for _, end in windows) + SETTLE_S - time.time()
    if wait > 0:
        time.sleep(wait)
    return asyncio.run(_count(pgdata, windows))
