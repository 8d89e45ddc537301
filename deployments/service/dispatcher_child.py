"""One extra dispatcher process of ``serve --workers N`` (``deployments/service/dispatchers.py``).

It runs a dispatcher loop and nothing else, against the API its parent set in
``PREFECT_API_URL``. It stops, letting the sends in flight finish, on SIGTERM/SIGINT or when its
stdin ends: the parent holds the other end, so a parent that dies (even by SIGKILL) stops it.
It keeps the service's stop budget (``deployments/service/stop_budget.py``): exited within 15 s.
"""

from __future__ import annotations

import asyncio
import signal
import sys
import threading
from typing import NoReturn

from deployments.service.api import prepare_environment
from deployments.service.stop_budget import (
    ShutdownClock,
    drain_prefect_services,
    join_within_budget,
)

__all__ = ["main"]


async def _run(stop_flag: threading.Event) -> None:
    from blocks.registry import aload_settings
    from deployments.service.dispatchers import run_dispatcher_loop
    from flows.sweep import Dispatcher

    stop = asyncio.Event()
    clock = ShutdownClock(stop_flag)

    async def watch() -> None:
        while not stop_flag.is_set():
            await asyncio.sleep(0.2)
        clock.begin()
        stop.set()

    watcher = asyncio.create_task(watch())
    try:
        dispatcher = Dispatcher(await aload_settings())
        await run_dispatcher_loop(dispatcher, stop, max_grace=clock.grace(float("inf")))
    finally:
        watcher.cancel()
        # Prefect's queued logs and events, within the budget (deployments/service/stop_budget.py).
        await asyncio.to_thread(drain_prefect_services, clock.left(0.5))


def _stop_at_end_of_stdin(stop: threading.Event) -> None:
    try:
        while sys.stdin.buffer.read(4096):
            pass
    except (OSError, ValueError):
        pass
    stop.set()


def main() -> NoReturn:
    """Runs the loop off the main thread, as ``serve`` does (the flow engine swaps SIGTERM
    handlers around runs it executes in the main thread)."""
    prepare_environment()
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    threading.Thread(target=_stop_at_end_of_stdin, args=(stop,), daemon=True).start()
    outcome: list[int] = []

    def loop() -> None:
        try:
            asyncio.run(_run(stop))
            outcome.append(0)
        except BaseException:
            outcome.append(1)
            raise

    worker = threading.Thread(target=loop, name="dicom-dispatch-dispatcher")
    worker.start()
    # Within the stop budget, as serve itself, whatever Prefect still has queued.
    join_within_budget(worker, stop, outcome)


if __name__ == "__main__":
    sys.exit(main())
