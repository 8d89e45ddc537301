"""What the Prefect server ``serve`` starts is told beyond Prefect's defaults, and what each costs.

Each value was measured with ``bench/service_bench.py`` (figures b and f: small cases dropped
at once, CPU per process group) on a 2-core host; README's capacity table has the numbers.

* **A larger database pool.** Prefect's default (5 connections, 10 more on demand) is smaller
  than what one case keeps busy at once (its API requests, the event persister, the task-run
  recorder, the triggers): the extra connections were opened and closed for every case or
  two — a PostgreSQL backend started each time and every statement prepared again. With 20
  kept, PostgreSQL's CPU per case halved and new sessions fell from ≈ 1.6 to ≈ 0.2 per case.
  Costs a few MB of PostgreSQL memory per idle connection. ``--api-processes N`` divide it.
* **The task-run recorder writes in batches.** Prefect's default writes each task-run state
  change in its own transaction as it arrives. Batches of up to 50, flushed at least every
  second, cut the server's CPU per case by ≈ 20 %. Costs: a task run's latest state reaches
  the UI up to a second later when the server is quiet (at once when busy: a full batch is
  written immediately). Flow runs, the case's truth, are not affected: their states are
  written by the API call that sets them.

A value the site set itself wins; a server of the site's own (``PREFECT_API_URL``) is
configured by the site.
"""

from __future__ import annotations

from collections.abc import Mapping

__all__ = ["POOL_CONNECTIONS", "SERVER_TUNING", "tuning_environment"]

POOL_SIZE = "PREFECT_SERVER_DATABASE_SQLALCHEMY_POOL_SIZE"
MAX_OVERFLOW = "PREFECT_SERVER_DATABASE_SQLALCHEMY_MAX_OVERFLOW"
#: Connections kept and opened on demand by one server process; ``--api-processes N`` share
#: them, so N processes and the services process stay within PostgreSQL's 100 connections.
POOL_CONNECTIONS = (20, 10)
SERVER_TUNING: dict[str, str] = {
    "PREFECT_SERVER_SERVICES_TASK_RUN_RECORDER_BATCH_SIZE": "50",
    "PREFECT_SERVER_SERVICES_TASK_RUN_RECORDER_FLUSH_INTERVAL": "1",
}


def tuning_environment(environ: Mapping[str, str], processes: int = 1) -> dict[str, str]:
    """The variables to add to the environment of one of ``processes`` server processes that
    share the pool's connections: those the site has not set."""
    kept, extra = POOL_CONNECTIONS
    share = max(1, processes)
    wanted = {
        POOL_SIZE: str(max(3, kept // share)),
        MAX_OVERFLOW: str(max(2, extra // share)),
        **SERVER_TUNING,
    }
    return {name: value for name, value in wanted.items() if not environ.get(name)}
