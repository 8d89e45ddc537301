"""What the Prefect server ``serve`` starts is told beyond Prefect's defaults, and what each costs.

Each value was measured with ``bench/service_bench.py`` (figures b and f: small cases dropped
at once, CPU per process group) on a 2-core host; README's capacity table has the numbers.

* **A larger database pool.** Prefect's default (5 connections, 10 more on demand) is smaller
  than what one case keeps busy at once (its API requests, the event persister, the task-run
  recorder, the triggers): the extra connections were opened and closed for every case or
  two — a PostgreSQL backend started each time and every statement prepared again. With 20
  kept, PostgreSQL's CPU per case halved and new sessions fell from ≈ 1.6 per case to none.
  Costs a few MB of PostgreSQL memory per idle connection.
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

__all__ = ["SERVER_TUNING", "tuning_environment"]

SERVER_TUNING: dict[str, str] = {
    "PREFECT_SERVER_DATABASE_SQLALCHEMY_POOL_SIZE": "20",
    "PREFECT_SERVER_DATABASE_SQLALCHEMY_MAX_OVERFLOW": "10",
    "PREFECT_SERVER_SERVICES_TASK_RUN_RECORDER_BATCH_SIZE": "50",
    "PREFECT_SERVER_SERVICES_TASK_RUN_RECORDER_FLUSH_INTERVAL": "1",
}


def tuning_environment(environ: Mapping[str, str]) -> dict[str, str]:
    """The variables to add to the server's environment: those the site has not set."""
    return {name: value for name, value in SERVER_TUNING.items() if not environ.get(name)}
