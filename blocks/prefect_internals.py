"""Every use of Prefect's internals (private names, engine behaviour), in one place.

Each one is a workaround with a reason, and each has a test in
``tests/unit/test_prefect_internals.py`` that checks the private thing still exists and behaves
as relied on here, so a Prefect upgrade fails loudly there and not in a case's attempt.

* :func:`block_name`: ``Block._block_document_name``, the document name a block was loaded
  under (Prefect 3 has no public accessor); a target without a mercure name is known by it.
* :func:`block_from_document`: ``Block._from_block_document``, a block from a document read by
  :func:`api_post` (the registry finds a target across all our block types in one call).
* :func:`api_post`: ``PrefectClient._client``, the client's own HTTP client: for filters that
  ``PrefectClient`` cannot send (block documents of several types in one request; artifacts,
  whose filters it sends as nulls that the 3.8 server refuses with 422).
* :func:`engine_view` and :func:`run_created_run`: ``prefect.flow_engine.run_flow_async`` runs
  a flow run created beforehand (from the ``dispatch-case`` deployment) in this process, without
  its deployment id, so the engine starts no suspension observer for it.
* :func:`defer_first_lease_renewal`: ``prefect.concurrency._leases._lease_renewal_loop``, the
  loop that keeps a task's tag-limit lease alive, renews the lease the moment it was granted
  (a request, a server lease write, an API client of its own, for every send); ours waits
  until Prefect's own renewal point (¾ of the lease) first, so a send shorter than that never
  renews, and a longer one renews as before.
* :func:`share_api_tls_contexts`: ``prefect.client.orchestration``'s use of :mod:`ssl`: every
  Prefect client (and Prefect makes one for nearly every conversation: the log and event
  shippers, a slot service, each ``get_client()`` outside a client context) builds a new SSL
  context from the CA bundle, ≈ 17 ms of CPU here, even for a plain-HTTP API. Ours are shared
  per CA file (and its size and modification time, so a renewed bundle is read again).
* :func:`prepare_server_database`: what ``create_app``'s start-up does before a server serves
  (``create_db``, ``run_block_auto_registration``), done once for ``serve --api-processes N``,
  whose API processes would otherwise all do it at once and collide.

The background job process (``flows/background/process.py``) uses the engine's entry points
for a forked process (``load_flow_run``, ``run_flow``, ``handle_engine_signals``, the log and
event workers' ``drain_all``) and preloads ``prefect._internal.observers``; they are checked by
the same tests (:data:`JOB_ENGINE_NAMES`).

Here, at the bottom of the layers that use Prefect, so blocks, flows and deployments share it.
"""

from __future__ import annotations

import concurrent.futures
import os
import ssl
import sys
import threading
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, TypeVar, cast

from prefect.blocks.core import Block
from prefect.client.orchestration import PrefectClient
from prefect.client.schemas.objects import BlockDocument, FlowRun, State

if TYPE_CHECKING:
    import httpx
    from prefect import Flow

__all__ = [
    "JOB_ENGINE_NAMES",
    "active_queue_services",
    "api_post",
    "block_from_document",
    "block_name",
    "defer_first_lease_renewal",
    "engine_view",
    "ephemeral_api_urls",
    "prepare_server_database",
    "queued_items",
    "start_drain",
    "run_created_run",
    "share_api_tls_contexts",
]

B = TypeVar("B", bound=Block)

#: (module, attribute or None) the background job process imports from Prefect's engine.
JOB_ENGINE_NAMES: tuple[tuple[str, str | None], ...] = (
    ("prefect.flow_engine", "load_flow_run"),
    ("prefect.flow_engine", "run_flow"),
    ("prefect.engine", "handle_engine_signals"),
    ("prefect.events.worker", "EventsWorker"),
    ("prefect.logging.handlers", "APILogWorker"),
    ("prefect._internal.observers", None),
)


def block_name(block: Block) -> str:
    """The name of the block document ``block`` was loaded from ("" if it was not loaded)."""
    return block._block_document_name or ""


def block_from_document(cls: type[B], document: BlockDocument) -> B:
    """The block of type ``cls`` that ``document`` holds (secrets included if it has them)."""
    return cls._from_block_document(document)


async def api_post(client: PrefectClient, path: str, body: Mapping[str, Any]) -> httpx.Response:
    """POST ``body`` to the API ``path`` (e.g. ``/block_documents/filter``) as the client would,
    with its base URL, auth and retries."""
    return await client._client.post(path, json=body)


def engine_view(run: FlowRun) -> FlowRun:
    """The run as the loop hands it to Prefect's engine: without its deployment id.

    For a run of a deployment the engine starts a suspension observer per run (a thread with
    its own event loop, API client and event subscription) so that a pause requested in the UI
    suspends the process. A case run is never paused (a case waits by its folder's
    ``next_retry_at``, and is stopped by HALT or cancelled), and that observer was the largest
    part of the client's cost per case. The run still belongs to the deployment on the server
    (UI Retry, events, filters); the engine reads it back with its deployment id once running.
    """
    return run.model_copy(update={"deployment_id": None})


async def run_created_run(
    flow: Flow[..., Any], run: FlowRun, parameters: dict[str, Any]
) -> State[Any]:
    """Run ``flow`` as the already created ``run`` in this process (:func:`engine_view`); its
    final state. The engine is imported here, when a run is started: importing the blocks (the
    CLI does) need not load it."""
    from prefect.flow_engine import run_flow_async

    state = await run_flow_async(
        flow, flow_run=engine_view(run), parameters=parameters, return_type="state"
    )
    if not isinstance(state, State):
        raise TypeError(f"the engine returned {type(state).__name__}, not the run's state")
    return state


def active_queue_services() -> list[Any]:
    """Prefect's queue services (log and event shippers, ...) of this process that still run.

    Their ``drain`` at interpreter exit retries for as long as the API is gone, past any stop
    budget; the service drains them itself, with a deadline
    (``deployments/service/stop_budget.py``). Not imported when Prefect never started one here.
    """
    services = sys.modules.get("prefect._internal.concurrency.services")
    if services is None:
        return []
    return [
        s
        for s in list(services._active_services)
        if s._started and s._done_event is not None and not s._done_event.is_set()
    ]


def start_drain(service: Any) -> concurrent.futures.Future[bool]:
    """Ask ``service`` to ship what it holds and stop; done when it has."""
    future: concurrent.futures.Future[bool] = service._drain(at_exit=True)
    return future


def queued_items(service: Any) -> int:
    """What ``service`` still holds, at least 1 (its queue ends in an end mark)."""
    return max(1, int(service._queue.qsize()) - 1)


def defer_first_lease_renewal() -> None:
    """Make Prefect's lease renewal loop wait ¾ of the lease before its first renewal.

    Idempotent; installed by the module that declares the send task, so every process that
    runs sends (``serve``, its dispatcher children, a work pool's worker) has it.
    """
    from prefect.concurrency import _leases

    loop = _leases._lease_renewal_loop
    if getattr(loop, "deferred_first_renewal", False):
        return

    def deferred(lease_id: Any, lease_duration: float, stop_event: threading.Event) -> None:
        if stop_event.wait(lease_duration * _leases._RENEWAL_FRACTION):
            return  # released before the first renewal was due: nothing to renew
        loop(lease_id, lease_duration, stop_event)

    deferred.deferred_first_renewal = True  # type: ignore[attr-defined]
    _leases._lease_renewal_loop = deferred


class _SharedTlsContexts:
    """:mod:`ssl` as Prefect's client module sees it once shared: a verified context per CA
    file. Any other call (the insecure setting's, which changes the context it gets) is
    passed through unchanged."""

    def __init__(self, module: Any) -> None:
        self._ssl = module
        self._lock = threading.Lock()
        self._contexts: dict[tuple[object, ...], ssl.SSLContext] = {}

    def __getattr__(self, name: str) -> Any:
        return getattr(self._ssl, name)

    def create_default_context(
        self,
        purpose: ssl.Purpose = ssl.Purpose.SERVER_AUTH,
        *,
        cafile: str | None = None,
        capath: str | None = None,
        cadata: str | bytes | None = None,
    ) -> ssl.SSLContext:
        create = self._ssl.create_default_context
        if cafile is None or capath is not None or cadata is not None:
            return cast(
                ssl.SSLContext, create(purpose, cafile=cafile, capath=capath, cadata=cadata)
            )
        try:
            stat = os.stat(cafile)
        except OSError:  # let ssl say what is wrong with it
            return cast(ssl.SSLContext, create(purpose, cafile=cafile))
        key = (purpose, cafile, stat.st_size, stat.st_mtime_ns)
        with self._lock:
            context = self._contexts.get(key)
            if context is None:
                context = self._contexts[key] = create(purpose, cafile=cafile)
            return context


def share_api_tls_contexts() -> None:
    """Prefect clients made from now on in this process share their verified SSL context.

    Idempotent; installed where a service process starts its dispatcher loop.
    """
    from prefect.client import orchestration

    module = cast(Any, orchestration)
    if not isinstance(module.ssl, _SharedTlsContexts):
        module.ssl = _SharedTlsContexts(module.ssl)


def ephemeral_api_urls() -> list[str]:
    """API URLs of the ephemeral subprocess servers started in this process (looked up, never
    started: importing the server module would load the whole server app)."""
    server = sys.modules.get("prefect.server.api.server")
    instances = server.SubprocessASGIServer._instances.values() if server else ()
    return [str(s.api_url) for s in instances if s.port is not None]


async def prepare_server_database() -> None:
    """Migrate the server's database and register Prefect's block types, as a server's start
    does (``create_app``'s ``run_migrations`` and ``add_block_types``), without serving."""
    from prefect.server.database import provide_database_interface
    from prefect.server.models.block_registration import run_block_auto_registration

    db = provide_database_interface()
    await db.create_db()
    session = await db.session()
    async with session:
        await run_block_auto_registration(session=session)
