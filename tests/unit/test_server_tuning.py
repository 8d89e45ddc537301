"""deployments/service/server_tuning.py: what the embedded server is told, and what wins."""

from __future__ import annotations

import pytest

from deployments.service.server_tuning import MAX_OVERFLOW, POOL_SIZE, tuning_environment

BATCH = "PREFECT_SERVER_SERVICES_TASK_RUN_RECORDER_BATCH_SIZE"


def test_one_server_process_keeps_twenty_connections_and_batches_task_runs() -> None:
    env = tuning_environment({})
    assert env[POOL_SIZE] == "20"
    assert env[MAX_OVERFLOW] == "10"
    assert env[BATCH] == "50"


def test_api_processes_share_the_pool_within_postgresqls_connections() -> None:
    services = 30  # the services process: one process's full pool
    for processes in range(2, 13):
        env = tuning_environment({}, processes)
        per_process = int(env[POOL_SIZE]) + int(env[MAX_OVERFLOW])
        assert processes * per_process + services <= 100


def test_prefect_reads_every_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    """Read back through the installed Prefect: a misspelt variable is silently ignored."""
    from prefect.settings import Settings

    for name, value in tuning_environment({}, 2).items():
        monkeypatch.setenv(name, value)
    server = Settings().server
    assert server.database.sqlalchemy.pool_size == 10
    assert server.database.sqlalchemy.max_overflow == 5
    assert server.services.task_run_recorder.batch_size == 50
    assert server.services.task_run_recorder.flush_interval == 1


def test_what_the_site_set_wins() -> None:
    env = tuning_environment({POOL_SIZE: "7", BATCH: "1"})
    assert POOL_SIZE not in env
    assert BATCH not in env
    assert env[MAX_OVERFLOW] == "10"
