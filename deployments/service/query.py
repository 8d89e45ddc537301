"""The query/retrieve deployments ``query``, ``retrieve``, ``retrieve-batch`` (architecture §4.3).

``dicom-dispatch serve`` adds them to its runner with :func:`add_query_deployments`. The
``retrieve`` deployment carries the concurrency limit of retrievals (a deployment limit: runs
beyond it wait as ``AwaitingConcurrencySlot`` *scheduled* runs, holding no process, on every
host that serves it). The limit is ``DispatcherSettings.retrieve_limit`` (default 2: PACS are
shared, and C-MOVE retrievals on one host take turns on the Storage SCP port anyway; 0 means no
limit), read when the deployments are served; the deprecated ``DICOM_DISPATCH_RETRIEVE_LIMIT``
still overrides it, with a warning. It can also be changed on the deployment in the UI until
the next start.

``python -m deployments.query_service`` serves only these three deployments, for a host that
does query/retrieve without dispatching (and for the tests); its ``--limit`` overrides the
setting.
"""

from __future__ import annotations

import asyncio
import sys
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from prefect.runner import Runner

__all__ = ["add_query_deployments", "aretrieve_limit"]


async def aretrieve_limit() -> int:
    """Retrievals at once across all hosts (0: no limit), from ``DispatcherSettings``."""
    from blocks.registry import aload_settings

    return (await aload_settings()).with_overrides().retrieve_limit


async def add_query_deployments(runner: Runner, limit: int | None = None) -> None:
    """Serve ``query``, ``retrieve`` (with the retrieval limit) and ``retrieve-batch``.

    ``limit`` (retrievals at once, 0: none) replaces ``DispatcherSettings.retrieve_limit``.
    """
    from prefect.client.schemas.objects import ConcurrencyLimitConfig, ConcurrencyLimitStrategy
    from prefect.types.entrypoint import EntrypointType

    from flows.query import RETRIEVE_TAG, query, retrieve, retrieve_batch

    wanted = await aretrieve_limit() if limit is None else limit
    concurrency = (
        ConcurrencyLimitConfig(limit=wanted, collision_strategy=ConcurrencyLimitStrategy.ENQUEUE)
        if wanted > 0
        else None
    )
    module = EntrypointType.MODULE_PATH
    await runner.aadd_flow(query, name="query", entrypoint_type=module)
    await runner.aadd_flow(
        retrieve,
        name="retrieve",
        entrypoint_type=module,
        concurrency_limit=concurrency,
        tags=[RETRIEVE_TAG],
    )
    await runner.aadd_flow(retrieve_batch, name="retrieve-batch", entrypoint_type=module)


async def _serve(limit: int | None) -> None:
    from prefect.runner import Runner

    from blocks.registry import aregister_block_types

    await aregister_block_types()
    runner = Runner(name="dicom-dispatch-query", pause_on_shutdown=False)
    await add_query_deployments(runner, limit)
    await runner.start()


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(
        prog="python -m deployments.query_service",
        description="Serve the query, retrieve and retrieve-batch deployments.",
    )
    parser.add_argument("--limit", type=int, default=None, help="retrievals at once (0: none)")
    args = parser.parse_args(argv)
    from deployments.service.api import choose_api, prepare_environment

    choose_api(prepare_environment())
    try:
        asyncio.run(_serve(args.limit))
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
