"""Whether the Prefect API answers, so the dispatcher claims nothing while it is down.

A case claimed while the API is away would get no run: the claim would be released again at
once, every scan, with an error logged each time. Instead the loop asks ``/health`` before it
claims (a fresh short-timeout client: the loop's own client retries for tens of seconds), logs
once when the API goes and once when it is back, and resumes by itself. An answer "up" holds for
a few seconds, so a busy loop does not ask before every scan.
"""

from __future__ import annotations

import logging
import time

import anyio
import httpx
from prefect.client.orchestration import get_client

from blocks.errors import DispatchError
from blocks.prefect_internals import ephemeral_api_urls

__all__ = ["ApiWatch", "api_bases", "is_api_outage"]

LOGGER = logging.getLogger(__name__)
UP_HOLDS_SECONDS = 10.0
CHECK_TIMEOUT = 4.0
#: Where Prefect's client reaches an API app running in its own process (``PrefectClient``).
IN_PROCESS_API = "http://ephemeral-prefect/api"


class ApiWatch:
    def __init__(self) -> None:
        self._up_until = 0.0
        self._down_since: float | None = None

    async def up(self) -> bool:
        if time.monotonic() < self._up_until:
            return True
        problem: object = "no answer"
        with anyio.move_on_after(CHECK_TIMEOUT):
            async with get_client(httpx_settings={"timeout": CHECK_TIMEOUT}) as client:
                problem = await client.api_healthcheck()
        if problem is None:
            if self._down_since is not None:
                LOGGER.warning(
                    "the Prefect API is back after %.0f s", time.monotonic() - self._down_since
                )
                self._down_since = None
            self._up_until = time.monotonic() + UP_HOLDS_SECONDS
            return True
        if self._down_since is None:
            self._down_since = time.monotonic()
            LOGGER.error("the Prefect API is down (%s): waiting for it", problem)
        return False


def is_api_outage(exc: BaseException) -> bool:
    """Whether an attempt broke because the Prefect API went away, not because of the case.

    Such an attempt is not the case's fault: it goes back in the queue uncounted, so a server
    restart does not push a case back by a whole ``retry_delay`` (mercure's 15 minutes). The
    causes are walked: Prefect wraps the transport error (a slot acquisition refused, a state
    that could not be set) in exceptions of its own. Only a request to the API this process
    talks to counts (:func:`api_bases`); a target's error (ours, or a peer's HTTP error that
    made it) is the case's failed attempt, counted, so a peer that is down reaches error/ at
    ``retry_max`` instead of being retried forever.
    """
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, DispatchError):
            return False  # a target's or the case's own error, whatever it was raised from
        if isinstance(current, httpx.TransportError | httpx.HTTPStatusError):
            if not _to_the_api(current):
                return False  # a peer's HTTP error (DICOMweb, XNAT): the case's attempt
            if isinstance(current, httpx.HTTPStatusError):
                return current.response.status_code >= 500
            return True
        current = current.__cause__ or current.__context__
    return False


def api_bases() -> list[httpx.URL]:
    """The base URLs of the Prefect API this process's clients use, in each of its modes.

    External or the service's embedded server: ``PREFECT_API_URL``. Without it, Prefect's
    client starts an ephemeral server in a subprocess on a free loopback port and talks to
    ``SubprocessASGIServer.api_url``; an in-process app (Prefect's own tests and tools) is
    reached at the fixed ``http://ephemeral-prefect/api``. The ephemeral server is only looked
    up, never started: with no API in use, no error can be the API's.
    """
    from prefect.settings import PREFECT_API_URL

    configured = PREFECT_API_URL.value()
    if configured:
        return [httpx.URL(str(configured))]
    return [httpx.URL(url) for url in (*ephemeral_api_urls(), IN_PROCESS_API)]


def _to_the_api(error: httpx.TransportError | httpx.HTTPStatusError) -> bool:
    try:
        url = error.request.url
    except RuntimeError:  # an error raised without its request
        return False
    return any(_under(url, base) for base in api_bases())


def _under(url: httpx.URL, base: httpx.URL) -> bool:
    """``url`` is ``base`` or a path below it, on the same scheme, host and port."""
    if (url.scheme, url.host, url.port) != (base.scheme, base.host, base.port):
        return False
    root = base.path.rstrip("/")
    return url.path == root or url.path.startswith(root + "/")
