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
import sys
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, TypeVar

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
    "engine_view",
    "ephemeral_api_urls",
    "prepare_server_database",
    "queued_items",
    "start_drain",
    "run_created_run",
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
