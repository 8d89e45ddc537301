"""Which broken attempts are the Prefect API's fault (put back uncounted) and which the case's."""

from __future__ import annotations

import sys
from collections.abc import Iterator

import httpx
import pytest
from prefect.concurrency._asyncio import ConcurrencySlotAcquisitionError
from prefect.settings import PREFECT_API_URL, temporary_settings

from blocks.errors import TransientTargetError
from flows._api_outage import api_bases, is_api_outage
from tests.peers.net import free_port

API = "http://127.0.0.1:4200/api"
REQUEST = httpx.Request("POST", f"{API}/v2/concurrency_limits/increment")
PEER = httpx.Request("POST", "http://127.0.0.1:8042/dicom-web/studies")


@pytest.fixture(autouse=True)
def api_url() -> Iterator[None]:
    with temporary_settings(updates={PREFECT_API_URL: API}):
        yield


def status_error(code: int) -> httpx.HTTPStatusError:
    response = httpx.Response(code, request=REQUEST)
    return httpx.HTTPStatusError(str(code), request=REQUEST, response=response)


def wrapped(cause: BaseException) -> BaseException:
    """As Prefect's task engine raises it: its own error, the transport error as the cause."""
    try:
        raise ConcurrencySlotAcquisitionError("Unable to acquire concurrency slots") from cause
    except ConcurrencySlotAcquisitionError as exc:
        return exc


def test_a_server_that_went_away_is_an_outage() -> None:
    assert is_api_outage(httpx.ConnectError("All connection attempts failed", request=REQUEST))
    assert is_api_outage(wrapped(httpx.ConnectError("refused", request=REQUEST)))
    assert is_api_outage(wrapped(httpx.ReadTimeout("timed out", request=REQUEST)))
    assert is_api_outage(wrapped(status_error(503)))


def test_what_the_server_refused_or_the_case_caused_is_counted() -> None:
    assert not is_api_outage(wrapped(status_error(422)))
    assert not is_api_outage(status_error(404))
    assert not is_api_outage(OSError(28, "No space left on device"))
    assert not is_api_outage(wrapped(ValueError("bad")))
    assert not is_api_outage(httpx.ConnectError("refused", request=PEER)), "a DICOMweb peer"


def test_a_targets_error_raised_from_a_peers_http_error_is_counted() -> None:
    """DICOMweb raises its own error ``from None``: the peer's error stays in the context."""
    with pytest.raises(TransientTargetError) as raised:
        _peer_refused()
    assert not is_api_outage(wrapped(raised.value))


def _peer_refused() -> None:
    try:
        raise httpx.ConnectError("refused", request=REQUEST)  # even at the API's address
    except httpx.ConnectError:
        raise TransientTargetError("DICOMweb: connection failed") from None


@pytest.fixture
def ephemeral() -> Iterator[str]:
    """No ``PREFECT_API_URL``: the client's API is an ephemeral server on a loopback port."""
    from prefect.server.api.server import SubprocessASGIServer

    port = free_port()
    server = SubprocessASGIServer(port=port)  # registered, not started: its URL is all we need
    try:
        with temporary_settings(restore_defaults={PREFECT_API_URL}):
            yield server.api_url
    finally:
        SubprocessASGIServer._instances.pop(port, None)


def test_external_api_only_its_own_requests() -> None:
    assert [str(u) for u in api_bases()] == [API]
    assert is_api_outage(wrapped(httpx.ConnectError("refused", request=REQUEST)))
    beside = httpx.Request("GET", "http://127.0.0.1:4200/apiary/x")  # same host, not the API
    assert not is_api_outage(httpx.ConnectError("refused", request=beside))
    assert not is_api_outage(wrapped(httpx.ConnectError("refused", request=PEER)))


def test_ephemeral_api_only_its_own_requests(ephemeral: str) -> None:
    """The mode of ``dispatch`` without ``serve``: a DICOMweb peer that refuses connections is
    the case's failed attempt; the ephemeral server that went away is an outage."""
    assert not is_api_outage(httpx.ConnectError("refused", request=PEER)), "a DICOMweb peer"
    assert not is_api_outage(wrapped(httpx.ConnectError("refused", request=PEER)))
    to_server = httpx.Request("POST", f"{ephemeral}/flow_runs/")
    assert is_api_outage(wrapped(httpx.ConnectError("refused", request=to_server)))


def test_in_process_api_only_its_own_requests(ephemeral: str) -> None:
    in_process = httpx.Request("POST", "http://ephemeral-prefect/api/flow_runs/")
    assert is_api_outage(wrapped(httpx.ReadTimeout("timed out", request=in_process)))
    assert not is_api_outage(wrapped(httpx.ReadTimeout("timed out", request=PEER)))


def test_no_api_in_use_no_outage(monkeypatch: pytest.MonkeyPatch) -> None:
    """No URL and no ephemeral server started: nothing is the API's, nothing is started."""
    server = sys.modules.get("prefect.server.api.server")
    if server is not None:  # an earlier test of this session started one: not this test's
        monkeypatch.setattr(server.SubprocessASGIServer, "_instances", {})
    with temporary_settings(restore_defaults={PREFECT_API_URL}):
        assert not is_api_outage(httpx.ConnectError("refused", request=PEER))
        assert [str(u) for u in api_bases()] == ["http://ephemeral-prefect/api"]


def test_a_cycle_of_causes_ends() -> None:
    first, second = RuntimeError("a"), RuntimeError("b")
    first.__context__, second.__context__ = second, first
    assert not is_api_outage(first)
