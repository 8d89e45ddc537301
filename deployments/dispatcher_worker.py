"""One extra dispatcher process of ``serve --workers N`` (``deployments/workers.py``).

It runs a dispatcher loop and nothing else, against the API its parent set in
``PREFECT_API_URL``. It stops, letting the sends in flight finish, on SIGTERM/SIGINT or when its
stdin ends: the parent holds the other end, so a parent that dies (even by SIGKILL) stops it.
"""

from __future__ import annotations

import asyncio
import signal
import sys
import threading

from deployments.environment import prepare_environment

__all__ = ["main"]


async def _run(stop_flag: threading.Event) -> None:
    from blocks.registry import aload_settings
    from deployments.workers import run_dispatcher_loop
    from flows.sweep import Dispatcher

    stop = asyncio.Event()

    async def watch() -> None:
        while not stop_flag.is_set():
            await asyncio.sleep(0.2)
        stop.set()

    watcher = asyncio.create_task(watch())
    try:
        await run_dispatcher_loop(Dispatcher(await aload_settings()), stop)
    finally:
        watcher.cancel()


def _stop_at_end_of_stdin(stop: threading.Event) -> None:
    try:
        while sys.stdin.buffer.read(4096):
            pass
    except (OSError, ValueError):
        pass
    stop.set()


def main() -> int:
    """Runs the loop off the main thread, as ``serve`` does (the flow engine swaps SIGTERM
    handlers around runs it executes in the main thread)."""
    prepare_environment()
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    threading.Thread(target=_stop_at_end_of_stdin, args=(stop,), daemon=True).start()
    failed: list[BaseException] = []

    def loop() -> None:
        try:
            asyncio.run(_run(stop))
        except BaseException as exc:
            failed.append(exc)
            raise

    worker = threading.Thread(target=loop, name="dicom-dispatch-dispatcher")
    worker.start()
    while worker.is_alive():
        worker.join(0.5)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
