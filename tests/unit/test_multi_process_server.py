"""``serve --api-processes N``: the settings it gives Prefect are ones Prefect reads, and Redis's
password stays in files of the data directory and the servers' environment.

Read back through the installed ``prefect`` and ``prefect-redis`` themselves: a misspelt
variable (``PREFECT_SERVER_CONCURRENCY__LEASE_STORAGE``) is silently ignored by Prefect, and
the server would then keep leases in memory, per process.
"""

from __future__ import annotations

import stat
from pathlib import Path

import pytest

from deployments.service.redis import EmbeddedRedis
from deployments.service.server import SETUP_DONE_ENV, PrefectServer, PrefectServices


@pytest.fixture
def redis(tmp_path: Path) -> EmbeddedRedis:
    found = EmbeddedRedis(tmp_path / "redis", tmp_path / "redis.log")
    (tmp_path / "redis").mkdir()
    found.port = 16379  # chosen at its first start
    return found


def test_prefect_reads_every_setting(redis: EmbeddedRedis, monkeypatch: pytest.MonkeyPatch) -> None:
    from prefect.settings import Settings
    from prefect_redis.client import RedisMessagingSettings

    for name, value in {**redis.prefect_settings(), **SETUP_DONE_ENV}.items():
        monkeypatch.setenv(name, value)
    server = Settings().server
    assert server.events.messaging_broker == "prefect_redis.messaging"
    assert server.events.messaging_cache == "prefect_redis.messaging"
    assert server.events.causal_ordering == "prefect_redis.ordering"
    assert server.concurrency.lease_storage == "prefect_redis.lease_storage"
    assert server.docket.url.startswith("redis://:")
    assert server.docket.url.endswith("@127.0.0.1:16379/1")
    assert server.database.migrate_on_start is False
    assert server.register_blocks_on_start is False
    messaging = RedisMessagingSettings()
    assert (messaging.host, messaging.port, messaging.db) == ("127.0.0.1", 16379, 0)
    assert messaging.password == redis.password


def test_the_modules_named_are_prefect_redis_ones() -> None:
    import importlib

    for module in ("prefect_redis.messaging", "prefect_redis.ordering"):
        found = importlib.import_module(module)
        assert hasattr(found, "Publisher") or hasattr(found, "CausalOrdering"), module
    from prefect_redis.lease_storage import ConcurrencyLeaseStorage  # noqa: F401


def test_the_password_is_made_once_kept_private_and_never_on_a_command_line(
    redis: EmbeddedRedis, tmp_path: Path
) -> None:
    password = redis.password
    path = tmp_path / "redis" / "password"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert EmbeddedRedis(tmp_path / "redis", tmp_path / "redis.log").password == password
    assert password not in " ".join(redis.command())
    assert f"requirepass {password}" in redis._config()
    assert "appendonly yes" in redis._config()
    assert "bind 127.0.0.1" in redis._config()


def test_api_processes_and_services_are_prefect_commands(tmp_path: Path) -> None:
    one = PrefectServer("127.0.0.1", 4200, tmp_path / "log")
    assert "--workers" not in one.command()
    several = PrefectServer("127.0.0.1", 4200, tmp_path / "log", processes=3)
    assert several.command()[-3:] == ["--workers", "3", "--no-services"]
    assert PrefectServices(tmp_path / "log").command()[-3:] == ["server", "services", "start"]
    assert "PREFECT_API_URL" not in PrefectServices(tmp_path / "log").environment()
