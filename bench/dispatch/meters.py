"""What a figure costs besides wall time: CPU seconds of every process involved, and the Prefect
API requests (counted and timed at httpx, where both Prefect clients send)."""

from __future__ import annotations

import re
import time
from collections import defaultdict
from typing import Any

#: Root processes of the running Prefect server and its database, for CPU accounting.
SERVER_PROCESSES: dict[str, int] = {}


def tree_cpu(pid: int) -> float:
    """User + system CPU seconds of a process and its descendants (live ones, and the exited
    children it has reaped)."""
    import psutil

    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
        reaped = root.cpu_times()
    except psutil.NoSuchProcess:
        return 0.0
    total = float(reaped.children_user + reaped.children_system)  # children that have exited
    for proc in procs:
        try:
            times = proc.cpu_times()
            total += float(times.user + times.system)
        except psutil.NoSuchProcess:
            pass
    return total


class CpuMeter:
    """CPU seconds used by this process (threads, not child processes), the Prefect server and
    its database between enter and exit."""

    def __init__(self) -> None:
        self.used: dict[str, float] = {}
        self._start: dict[str, float] = {}

    def _now(self) -> dict[str, float]:
        import psutil

        times = psutil.Process().cpu_times()
        now = {"dispatcher process": times.user + times.system}
        now.update({name: tree_cpu(pid) for name, pid in SERVER_PROCESSES.items()})
        return now

    def __enter__(self) -> CpuMeter:
        self._start = self._now()
        return self

    def __exit__(self, *exc: object) -> None:
        end = self._now()
        self.used = {k: end[k] - self._start.get(k, 0.0) for k in end}

    def per_case_ms(self, cases: int) -> dict[str, float]:
        """For ``--json``: CPU ms per case of each process."""
        return {k: round(v / cases * 1e3, 1) for k, v in self.used.items()}

    def line(self, cases: int) -> str:
        parts = [f"{name} {seconds / cases * 1e3:.0f}" for name, seconds in self.used.items()]
        total = sum(self.used.values()) / cases * 1e3
        return f"CPU ms per case: {', '.join(parts)}; total {total:.0f}"


class ApiTrace:
    """Counts and times the Prefect client's HTTP requests, async and sync (patches httpx's
    ``AsyncClient.send`` and ``Client.send``); counts the SSL contexts httpx creates too (each
    new Prefect client makes one, which costs tens of ms of CPU here)."""

    _UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")

    def __init__(self) -> None:
        self.calls: dict[str, list[float]] = defaultdict(list)
        self.ssl_contexts = 0
        self._saved: list[tuple[Any, str, Any]] = []

    def _record(self, request: Any, status: str, started: float, sync: bool) -> None:
        path = self._UUID.sub(":id", request.url.path).removeprefix("/api")
        outcome = "" if status.startswith("2") else f" -> {status}"
        kind = " (sync client)" if sync else ""
        self.calls[f"{request.method} {path}{outcome}{kind}"].append(time.perf_counter() - started)

    def __enter__(self) -> ApiTrace:
        import httpx
        import httpx._transports.default as transports

        trace = self
        async_send = httpx.AsyncClient.send
        sync_send = httpx.Client.send
        make_ssl = transports.create_ssl_context  # type: ignore[attr-defined]

        async def asend(client: Any, request: Any, *args: Any, **kwargs: Any) -> Any:
            started, status = time.perf_counter(), "error"
            try:
                response = await async_send(client, request, *args, **kwargs)
                status = str(response.status_code)
                return response
            finally:
                trace._record(request, status, started, sync=False)

        def send(client: Any, request: Any, *args: Any, **kwargs: Any) -> Any:
            started, status = time.perf_counter(), "error"
            try:
                response = sync_send(client, request, *args, **kwargs)
                status = str(response.status_code)
                return response
            finally:
                trace._record(request, status, started, sync=True)

        def ssl_context(*args: Any, **kwargs: Any) -> Any:
            trace.ssl_contexts += 1
            return make_ssl(*args, **kwargs)

        self._saved = [
            (httpx.AsyncClient, "send", async_send),
            (httpx.Client, "send", sync_send),
            (transports, "create_ssl_context", make_ssl),
        ]
        httpx.AsyncClient.send = asend  # type: ignore[method-assign,assignment]
        httpx.Client.send = send  # type: ignore[method-assign,assignment]
        transports.create_ssl_context = ssl_context  # type: ignore[attr-defined]
        return self

    def __exit__(self, *exc: object) -> None:
        for owner, name, original in self._saved:
            setattr(owner, name, original)
