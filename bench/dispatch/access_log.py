"""The Prefect API requests of a window, by route, as the server saw them.

The service's clients live in other processes (the dispatchers, their flow runs), so they are
counted where they all arrive: uvicorn's access log of ``prefect server start`` (one line per
request once the server logs at INFO, see ``running_service(access_log=True)``). A window is a
pair of byte offsets in that log. Paths are mapped onto the server's own route templates
(``POST /api/flow_runs/{id}/set_state``), so counts add up per endpoint whatever the ids.
Websocket connections (events in, logs out) are counted apart: one per client, not per event.
"""

from __future__ import annotations

import re
import time
from collections import Counter
from functools import cache
from pathlib import Path
from typing import Any

_HTTP = re.compile(r'"(GET|POST|PUT|PATCH|DELETE|HEAD|OPTIONS) (\S+) HTTP/[\d.]+" (\d{3})')
_WEBSOCKET = re.compile(r'"WebSocket (\S+)" \[accepted\]')
_UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")


@cache
def _routes() -> list[tuple[set[str], Any, str]]:
    """(methods, compiled path, template) of every API route, in the server's matching order."""
    from prefect.server.api.server import API_ROUTERS

    routes: list[Any] = [route for router in API_ROUTERS for route in router.routes]
    return [
        (set(route.methods or ()), route.path_regex, route.path)
        for route in routes
        if hasattr(route, "path_regex") and hasattr(route, "methods")
    ]


def template(method: str, path: str) -> str:
    """``METHOD /api/<route template>`` for a request line; ids replaced when no route matches."""
    path = path.split("?", 1)[0]
    inner = path.removeprefix("/api")
    if inner != path:
        for methods, regex, route in _routes():
            if method in methods and regex.match(inner):
                return f"{method} /api{route}"
    return f"{method} {_UUID.sub('{id}', path)}"


class AccessLog:
    """The server's log file; ``mark()`` gives a window edge, ``between()`` its requests."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def mark(self) -> int:
        time.sleep(0.2)  # a response just sent is logged a moment later
        return self.path.stat().st_size

    def between(self, start: int, end: int) -> Counter[str]:
        """Requests per route template (``-> status`` added unless 2xx/3xx), and websocket
        connections as ``WS <path>``."""
        with open(self.path, "rb") as log:
            log.seek(start)
            text = log.read(end - start).decode(errors="replace")
        counts: Counter[str] = Counter()
        for line in text.splitlines():
            if found := _HTTP.search(line):
                method, path, status = found.groups()
                outcome = "" if status[0] in "23" else f" -> {status}"
                counts[template(method, path) + outcome] += 1
            elif found := _WEBSOCKET.search(line):
                counts[f"WS {_UUID.sub('{id}', found.group(1))}"] += 1
        return counts
