"""Which broken attempts are the Prefect API's fault (put back uncounted) and which the case's."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest
from prefect.concurrency._asyncio import ConcurrencySlotAcquisitionError
from prefect.settings import PREFECT_API_URL, temporary_settings

from flows._api_wait import is_api_outage

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


def test_a_cycle_of_causes_ends() -> None:
    first, second = RuntimeError("a"), RuntimeError("b")
    first.__context__, second.__context__ = second, first
    assert not is_api_outage(first)
