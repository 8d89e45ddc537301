"""``python -m deployments.background_service``: a background executor on this host.

``dicom-dispatch serve`` runs one executor itself (``run_background_executor``); this entry point
adds one on another host that shares the Prefect API, so the jobs' limits hold across hosts. The
executor (admission, processes, leases) is ``flows.background.executor``; its tuning is the
``jobs_*`` fields of ``DispatcherSettings``.
"""

from __future__ import annotations

import asyncio
import signal
import sys

from flows.background.executor import (
    BackgroundExecutor,
    ExecutorSettings,
    run_background_executor,
)

__all__ = ["BackgroundExecutor", "ExecutorSettings", "main", "run_background_executor"]


def main(argv: list[str] | None = None) -> int:
    """``python -m deployments.background_service``: an executor on this host."""
    import argparse

    from deployments.service.api import decide_api, prepare_environment, use_api
    from deployments.service.log import log_to_stderr

    parser = argparse.ArgumentParser(
        prog="python -m deployments.background_service",
        description="Run queued dicom-dispatch background jobs on this host.",
    )
    parser.parse_args(argv)
    home = prepare_environment()
    choice = decide_api(home, "executor")
    if choice.kind == "none":
        print(
            "background executor: no Prefect API; set PREFECT_API_URL or start "
            "dicom-dispatch serve",
            file=sys.stderr,
        )
        return 2
    use_api(home, choice)
    log_to_stderr()

    async def run() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        print("background executor running", flush=True)
        await run_background_executor(stop)

    asyncio.run(run())
    return 0


if __name__ == "__main__":
    sys.exit(main())
