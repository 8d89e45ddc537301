"""blocks/prefect_internals.py: each workaround for Prefect's internals still holds.

One test per workaround; each checks that the private thing exists and behaves as the project
relies on, so a Prefect upgrade that changes it fails here, loudly, and not in a case's
attempt. No Prefect server: blocks and runs are values, the HTTP client is not called.
"""

from __future__ import annotations

import asyncio
import importlib
import inspect
import re
import time
from uuid import uuid4

import httpx
import pytest
from prefect import flow
from prefect.blocks.core import Block
from prefect.client.orchestration import PrefectClient
from prefect.client.schemas.objects import FlowRun

from blocks import prefect_internals as internals
from blocks.folder import FolderTarget


def test_block_name_is_the_private_document_name() -> None:
    block = FolderTarget(folder="/data/out")
    assert internals.block_name(block) == ""  # never loaded
    assert "_block_document_name" in Block.__private_attributes__
    block._block_document_name = "pacs-main"
    assert internals.block_name(block) == "pacs-main"


def test_block_from_document_sets_the_document_name() -> None:
    """``_from_block_document`` is what loading calls, and it records the document's name. (Not
    called here: it emits a "loaded" event, which needs an API; the registry's integration
    tests load real documents through it.)"""
    method = getattr(Block, "_from_block_document", None)
    assert callable(method)
    assert list(inspect.signature(method).parameters) == ["block_document"]
    assert "block._block_document_name = block_document.name" in inspect.getsource(method)
    document = FolderTarget(folder="/data/out")._to_block_document(
        name="pacs-main", block_schema_id=uuid4(), block_type_id=uuid4()
    )
    assert document.name == "pacs-main"


def test_api_post_uses_the_clients_own_http_client() -> None:
    """``PrefectClient._client`` is an httpx client with the API as its base URL: a POST to a
    path reaches ``<api>/<path>`` with the client's headers (answered here by a transport)."""
    seen: list[httpx.Request] = []

    def answer(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(200, json=[])

    async def post() -> httpx.Response:
        client = PrefectClient(
            "http://127.0.0.1:9/api", httpx_settings={"transport": httpx.MockTransport(answer)}
        )
        assert isinstance(client._client, httpx.AsyncClient)
        async with client._client:
            return await internals.api_post(client, "/artifacts/filter", {"limit": 1})

    response = asyncio.run(post())
    assert response.json() == []
    assert [str(r.url) for r in seen] == ["http://127.0.0.1:9/api/artifacts/filter"]
    assert seen[0].content == b'{"limit":1}' or b'"limit": 1' in seen[0].content


def test_engine_view_drops_only_the_deployment_id() -> None:
    run = FlowRun(flow_id=uuid4(), deployment_id=uuid4(), name="acc case", tags=["case:c"])
    view = internals.engine_view(run)
    assert view.deployment_id is None
    assert run.deployment_id is not None  # a copy
    assert view.model_dump(exclude={"deployment_id"}) == run.model_dump(exclude={"deployment_id"})


def test_the_engine_observes_suspension_only_for_runs_with_a_deployment_id() -> None:
    """Why :func:`engine_view` saves the observer: the engine starts it only when the run it
    is given has a deployment id."""
    from prefect import flow_engine

    source = inspect.getsource(flow_engine)
    pattern = (
        r"if self\.flow_run\.deployment_id:\s+"
        r"stack\.enter_context\(\s+observe_flow_run_suspension"
    )
    assert re.search(pattern, source), "the engine's suspension observer is no longer gated"


def test_run_flow_async_takes_a_created_run_and_returns_its_state() -> None:
    from prefect.flow_engine import run_flow_async

    signature = inspect.signature(run_flow_async)
    assert {"flow", "flow_run", "parameters", "return_type"} <= set(signature.parameters)
    assert inspect.iscoroutinefunction(run_flow_async)
    assert inspect.iscoroutinefunction(internals.run_created_run)


def test_the_created_run_keeps_its_name_when_the_name_function_is_cleared() -> None:
    """``flows/dispatch.py`` clears ``flow_run_name`` on a copy of the flow, so the engine does
    not rename a run the loop named when it created it."""

    @flow(flow_run_name=lambda: "named")
    def named() -> None: ...

    copy = named.with_options()
    copy.flow_run_name = None
    assert named.flow_run_name is not None
    assert copy.flow_run_name is None


@pytest.mark.parametrize(("module", "name"), internals.JOB_ENGINE_NAMES)
def test_the_job_process_finds_the_engines_entry_points(module: str, name: str | None) -> None:
    loaded = importlib.import_module(module)
    if name is not None:
        assert hasattr(loaded, name), f"{module}.{name} is gone"
    if name in ("EventsWorker", "APILogWorker"):
        assert callable(getattr(loaded, name).drain_all)


def test_the_job_process_preloads_what_the_checks_cover() -> None:
    from flows.background.process import JOB_PRELOAD

    engine_modules = {m for m in JOB_PRELOAD if m.startswith("prefect")}
    assert engine_modules <= {m for m, _ in internals.JOB_ENGINE_NAMES} | {"prefect.engine"}


def test_queue_services_can_be_listed_drained_and_counted() -> None:
    """The stop budget drains Prefect's queue services itself (their exit drain is unbounded):
    the registry, the start/done flags, ``_drain`` and the queue must be where we read them."""
    from prefect._internal.concurrency import services

    list(services._active_services)  # a (weak) set of the running services
    for name in ("_started", "_done_event", "_queue"):
        assert name in inspect.getsource(services._QueueServiceBase.__init__), name
    assert "at_exit" in inspect.signature(services._QueueServiceBase._drain).parameters
    assert internals.active_queue_services() == [
        s for s in internals.active_queue_services() if s._started
    ]


def test_ephemeral_servers_are_listed_with_their_url() -> None:
    """The outage rule recognises an ephemeral server's requests by its URL."""
    from prefect.server.api.server import SubprocessASGIServer

    assert isinstance(SubprocessASGIServer._instances, dict)
    assert isinstance(inspect.getattr_static(SubprocessASGIServer, "api_url"), property)
    assert all(url.startswith("http") for url in internals.ephemeral_api_urls())


class _NoClient:
    """Stands for the renewal loop's sync client: entering it must not reach any API."""

    def __enter__(self) -> _NoClient:
        return self

    def __exit__(self, *exc: object) -> None:
        return None


def test_the_first_lease_renewal_waits_until_prefects_renewal_point(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A lease released before ¾ of its duration is never renewed (no client, no request); a
    longer one is renewed from then on, by Prefect's own loop, from the thread Prefect starts."""
    from prefect.concurrency import _leases

    clients: list[float] = []
    renewals: list[float] = []

    def no_client(**_: object) -> _NoClient:
        clients.append(time.monotonic())
        return _NoClient()

    def renew(*_: object) -> bool:
        renewals.append(time.monotonic())
        return True

    monkeypatch.setattr(_leases, "_lease_renewal_loop", _leases._lease_renewal_loop)
    monkeypatch.setattr(_leases, "get_client", no_client)
    monkeypatch.setattr(_leases, "_renew_concurrency_lease_with_retries", renew)
    internals.defer_first_lease_renewal()
    internals.defer_first_lease_renewal()  # idempotent: not wrapped twice

    def hold(duration: float, seconds: float) -> float:
        started = time.monotonic()
        stop, thread = _leases._start_lease_renewal_thread(uuid4(), duration, False, True, None)  # type: ignore[arg-type]
        time.sleep(seconds)
        stop.set()
        thread.join(5)
        assert not thread.is_alive()
        return started

    hold(0.8, 0.3)  # released before its renewal point (0.6 s)
    assert clients == []
    assert renewals == []
    started = hold(0.4, 0.5)  # renewal point 0.3 s
    assert len(clients) == 1
    assert len(renewals) == 1
    assert renewals[0] - started >= 0.75 * 0.4 - 0.01


def test_prefect_clients_share_one_verified_tls_context(
    monkeypatch: pytest.MonkeyPatch, tmp_path: pytest.TempPathFactory
) -> None:
    """Prefect's client builds its context with ``ssl.create_default_context(cafile=...)``
    through its module's ``ssl``: shared, it is built once per CA file; the insecure setting's
    context (changed after it is made) is never shared."""
    import ssl

    from prefect.client import orchestration
    from prefect.settings import PREFECT_API_TLS_INSECURE_SKIP_VERIFY, temporary_settings

    assert "ssl.create_default_context(cafile=cert_file)" in inspect.getsource(orchestration)
    made: list[object] = []
    real = ssl.create_default_context

    def counted(*args: object, **kwargs: object) -> ssl.SSLContext:
        made.append(kwargs.get("cafile"))
        return real(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(orchestration, "ssl", ssl)
    monkeypatch.setattr(ssl, "create_default_context", counted)
    internals.share_api_tls_contexts()
    internals.share_api_tls_contexts()  # idempotent
    for _ in range(3):
        PrefectClient("http://127.0.0.1:9/api")
    assert len(made) == 1  # the CA file of the settings (certifi's by default)
    assert made[0]
    with temporary_settings({PREFECT_API_TLS_INSECURE_SKIP_VERIFY: True}):
        insecure = [PrefectClient("http://127.0.0.1:9/api") for _ in range(2)]
    assert made[1:] == [None, None]
    assert len(insecure) == 2


def test_the_server_database_is_prepared_as_a_server_start_does() -> None:
    """``serve --api-processes N`` migrates and registers block types once, as ``create_app``'s
    start-up would in each API process."""
    from prefect.server.api import server
    from prefect.server.models.block_registration import run_block_auto_registration

    start_up = inspect.getsource(server.create_app)
    assert "await db.create_db()" in start_up
    assert "run_block_auto_registration(session=session)" in start_up
    assert list(inspect.signature(run_block_auto_registration).parameters) == ["session"]
    assert inspect.iscoroutinefunction(internals.prepare_server_database)
