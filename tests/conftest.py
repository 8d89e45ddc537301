"""Session fixtures: a real Prefect server on embedded PostgreSQL, and per-test dispatcher folders.

The environment is set before Prefect is imported (Prefect reads it once): no telemetry, a
throw-away PREFECT_HOME and data directory. The session server requires an auth string, as the
service's does: every client in the tests (this process, CLI and ``serve`` subprocesses) gets it
as ``PREFECT_API_AUTH_STRING``. The suite's job functions are registered as background jobs the
way a site registers its own (``DICOM_DISPATCH_JOBS``).
"""

from __future__ import annotations

import os
import secrets
import tempfile
from collections.abc import Iterator
from pathlib import Path

_SESSION_DIR = Path(tempfile.mkdtemp(prefix="dicom-dispatch-tests-"))
#: The session server's auth string.
API_AUTH_STRING = f"tests:{secrets.token_urlsafe(16)}"
#: The functions of ``tests.jobs_fixtures`` that the suite runs as background jobs.
TEST_JOBS = (
    "timed",
    "wait_for_file",
    "report_identity",
    "error_exit",
    "boom",
    "exit_with",
    "quick",
)
os.environ.setdefault("PREFECT_HOME", str(_SESSION_DIR / "prefect-home"))
os.environ["DICOM_DISPATCH_HOME"] = str(_SESSION_DIR / "data")
os.environ.update(
    {
        "PREFECT_CLIENT_CSRF_SUPPORT_ENABLED": "false",
        "DO_NOT_TRACK": "1",
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "AWS_EC2_METADATA_DISABLED": "true",
        "PREFECT_LOGGING_LEVEL": os.environ.get("PREFECT_LOGGING_LEVEL", "WARNING"),
        # The test server's run-history vacuum (configured as serve does) looks every few
        # seconds, so a test can watch it delete runs whose end it backdated.
        "PREFECT_SERVER_SERVICES_DB_VACUUM_LOOP_SECONDS": "3",
        "DICOM_DISPATCH_JOBS": ",".join(f"tests.jobs_fixtures:{name}" for name in TEST_JOBS),
    }
)

import pytest  # noqa: E402

from tests.dispatch_env import DispatchEnv  # noqa: E402


@pytest.fixture(scope="session")
def prefect_server() -> Iterator[str]:
    """A real ``prefect server start`` on embedded PostgreSQL; the API URL is set for the test."""
    from prefect.settings import (
        PREFECT_API_AUTH_STRING,
        PREFECT_API_URL,
        PREFECT_FLOWS_HEARTBEAT_FREQUENCY,
        temporary_settings,
    )

    from tests.peers.prefect_server import running_prefect_server

    with running_prefect_server(
        _SESSION_DIR / "prefect-server", auth_string=API_AUTH_STRING
    ) as server:
        os.environ["PREFECT_API_URL"] = server.api_url  # for CLI subprocesses
        os.environ["PREFECT_API_AUTH_STRING"] = API_AUTH_STRING
        with temporary_settings(
            updates={
                PREFECT_API_URL: server.api_url,
                PREFECT_API_AUTH_STRING: API_AUTH_STRING,
                PREFECT_FLOWS_HEARTBEAT_FREQUENCY: None,
            }
        ):
            import asyncio

            from blocks.registry import aregister_block_types

            asyncio.run(aregister_block_types())
            yield server.api_url
            _drain_prefect_workers()
        os.environ.pop("PREFECT_API_URL", None)
        os.environ.pop("PREFECT_API_AUTH_STRING", None)


def _drain_prefect_workers() -> None:
    """Ship queued logs and events while the server is still up (as prefect_test_harness does)."""
    from prefect.events.worker import EventsWorker
    from prefect.logging.handlers import APILogWorker

    APILogWorker.drain_all(timeout=10)
    EventsWorker.drain_all(timeout=10)


@pytest.fixture(autouse=True)
def _environment_restored() -> Iterator[None]:
    """What a test leaves in ``os.environ`` goes with it. ``monkeypatch.delenv`` of a variable
    that is not set records nothing, so a value the code under test sets afterwards (the
    encryption key ``ensure_encryption_key`` exports, say) would otherwise reach every later
    test of the process, and every server it starts."""
    saved = dict(os.environ)
    yield
    if os.environ != saved:
        os.environ.clear()
        os.environ.update(saved)


@pytest.fixture
def env(prefect_server: str, tmp_path: Path) -> DispatchEnv:
    e = DispatchEnv(tmp_path / "outgoing", tmp_path / "success", tmp_path / "error")
    for folder in (e.outgoing, e.success, e.error):
        folder.mkdir()
    e.save_settings()
    return e
