"""DICOMweb query/retrieve: QIDO-RS and WADO-RS for ``DicomWebTarget.find``/``retrieve``.

The same contract as the DIMSE half (``blocks._dimse_qr``): the same find (``blocks.qr``), filters,
rows, checks on received objects (``blocks._receiver``), file names and errors.

* **QIDO-RS** is hierarchical like the C-FIND: ``/studies?AccessionNumber=…`` with the
  study-level filters, then ``/studies/{uid}/series`` with the series-level filters. A filter
  with one value goes to the server (its wildcard and range matching apply); a filter with
  several values is not sent and is checked here, exactly, on every row (mercure sent no
  filter at all as soon as one had several values). Paged answers (``Warning: 299``) are
  followed with ``offset``.
* **WADO-RS** is streamed: one request per study (or per series when series-level filters
  narrow it), ``multipart/related; type="application/dicom"`` read part by part from the
  socket, so at most one instance is in memory; each part is checked and written as soon as it
  is complete (mercure loaded whole series into memory and slept 0.5 s per instance). The
  original transfer syntax is asked for (``transfer-syntax=*``); a server that refuses that is
  asked again without it.
* ``file://`` targets use dicomweb-client's file client, as mercure does.

HTTP and connection errors go through the target's one translation boundary
(``DicomWebTarget._translate``): 5xx, timeouts and refused connections are transient, 4xx
permanent, messages without secrets.
"""

from __future__ import annotations

import io
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import httpx
from pydicom import dcmwrite
from pydicom.datadict import tag_for_keyword
from pydicom.dataset import Dataset

from blocks._receiver import Receiver, check_result
from blocks.errors import PermanentTargetError, public_url
from blocks.qr import (
    Filters,
    Level,
    RetrieveItem,
    RetrieveResult,
    check_query,
    find_rows,
    not_found,
    plan_retrieve,
    row_from_dataset,
)

if TYPE_CHECKING:
    from blocks.base import RetrieveRequest
    from blocks.dicomweb import DicomWebTarget

__all__ = ["find", "iter_multipart", "retrieve"]

_DICOM_JSON = "application/dicom+json"
_MULTIPART = 'multipart/related; type="application/dicom"'
#: Parts larger than this are refused (a broken stream must not fill the memory).
MAX_PART_BYTES = 4 * 1024 * 1024 * 1024
_MAX_PAGES = 1000


# --------------------------------------------------------------------------------------------
# QIDO-RS
# --------------------------------------------------------------------------------------------


def _includefields(keys: Sequence[str]) -> list[tuple[str, str]]:
    out = []
    for key in keys:
        tag = tag_for_keyword(key)
        if tag is not None:
            out.append(("includefield", f"{tag:08X}"))
    return out


def _matching(filters: Filters) -> list[tuple[str, str]]:
    """Query parameters for the single-valued filters (the others are checked client-side)."""
    return [(key, values[0]) for key, values in filters.items() if len(values) == 1]


class _Qido:
    """QIDO-RS over HTTP, or dicomweb-client's file client for ``file://`` targets."""

    def __init__(self, target: DicomWebTarget) -> None:
        self.target = target
        self.base = target.service_url("qido")

    def search(
        self, path: str, params: list[tuple[str, str]], client: httpx.Client | None
    ) -> list[dict[str, Any]]:
        if client is None:
            return self._search_files(path, params)
        url = f"{self.base}/{path}"
        found: list[dict[str, Any]] = []
        with self.target._translate("QIDO-RS", url):
            for _page in range(_MAX_PAGES):
                query: list[tuple[str, str | int | float | bool | None]] = [*params]
                if found:
                    query.append(("offset", len(found)))
                response = client.get(url, params=query, headers={"Accept": _DICOM_JSON})
                if response.status_code == 204:
                    break
                response.raise_for_status()
                page = response.json() if response.content else []
                if not isinstance(page, list):
                    raise PermanentTargetError(
                        f"{public_url(url)}: QIDO-RS answer is not a JSON array"
                    )
                found.extend(page)
                warning = response.headers.get("Warning", "").lower()
                if not page or "299" not in warning:
                    break
        return found

    def _search_files(self, path: str, params: list[tuple[str, str]]) -> list[dict[str, Any]]:
        fields = [value for key, value in params if key == "includefield"]
        filters = {key: value for key, value in params if key != "includefield"}
        with self.target._translate("searching the folder"):
            client = self.target.get_file_client()
            if path == "studies":
                return list(
                    client.search_for_studies(
                        search_filters=filters, fields=fields, get_remaining=True
                    )
                )
            study_uid = path.split("/")[1]
            return list(
                client.search_for_series(
                    study_instance_uid=study_uid,
                    search_filters=filters,
                    fields=fields,
                    get_remaining=True,
                )
            )


def _rows(items: Iterable[dict[str, Any]], keys: Sequence[str]) -> list[dict[str, Any]]:
    rows = []
    for item in items:
        try:
            ds = Dataset.from_json(item)
        except Exception as exc:  # a server's malformed entry: say so, don't guess
            raise PermanentTargetError(f"QIDO-RS answer is not DICOM JSON: {exc}") from None
        rows.append(row_from_dataset(ds, keys))
    return rows


@dataclass(frozen=True)
class _QidoRows:
    """``blocks.qr.RowSource`` over QIDO-RS (``client`` None: the file client)."""

    qido: _Qido
    client: httpx.Client | None

    def studies(
        self, accession: str, filters: Filters, keys: Sequence[str]
    ) -> list[dict[str, Any]]:
        params = [("AccessionNumber", accession), *_matching(filters), *_includefields(keys)]
        return _rows(self.qido.search("studies", params, self.client), keys)

    def series(self, study_uid: str, filters: Filters, keys: Sequence[str]) -> list[dict[str, Any]]:
        params = [*_matching(filters), *_includefields(keys)]
        path = f"studies/{study_uid}/series"
        return _rows(self.qido.search(path, params, self.client), keys)


def _find(
    target: DicomWebTarget,
    accession: str,
    filters: Filters,
    level: Level,
    shared: httpx.Client | None = None,
) -> list[dict[str, Any]]:
    client = shared if shared is not None or target.is_file_url else target.get_client()
    try:
        return find_rows(_QidoRows(_Qido(target), client), accession, filters, level)
    finally:
        if client is not None and client is not shared:
            client.close()


def find(
    target: DicomWebTarget, accession: str, filters: Mapping[str, Any] | None, level: Level
) -> list[dict[str, Any]]:
    """``DicomWebTarget.find``: QIDO-RS rows for one accession number (``blocks.qr.find_rows``)."""
    accession, wanted = check_query(accession, filters, level)
    return _find(target, accession, wanted, level)


# --------------------------------------------------------------------------------------------
# WADO-RS
# --------------------------------------------------------------------------------------------


def _boundary(content_type: str) -> bytes:
    for param in content_type.split(";")[1:]:
        key, _, value = param.strip().partition("=")
        if key.strip().lower() == "boundary" and value.strip():
            return value.strip().strip('"').encode("latin-1")
    raise PermanentTargetError(f"WADO-RS answer is not multipart ({content_type or 'no type'})")


def iter_multipart(chunks: Iterable[bytes], boundary: bytes) -> Iterator[bytes]:
    """The bodies of a ``multipart/related`` stream, one at a time, as they complete.

    Only the part being received (and one chunk) is held in memory.
    """
    delimiter = b"--" + boundary
    separator = b"\r\n" + delimiter
    buffer = bytearray()
    started = False
    search_from = 0
    for chunk in chunks:
        buffer += chunk
        while True:
            if not started:
                at = buffer.find(delimiter)
                if at < 0:
                    del buffer[: max(0, len(buffer) - len(delimiter))]
                    break
                del buffer[: at + len(delimiter)]
                started = True
                search_from = 0
            if len(buffer) < 2:
                break
            if buffer[:2] == b"--":
                return
            head_end = buffer.find(b"\r\n\r\n")
            if head_end < 0:
                break
            end = buffer.find(separator, max(head_end + 4, search_from))
            if end < 0:
                if len(buffer) > MAX_PART_BYTES:
                    raise PermanentTargetError("WADO-RS part larger than the limit")
                search_from = max(head_end + 4, len(buffer) - len(separator))
                break
            yield bytes(buffer[head_end + 4 : end])
            del buffer[: end + len(separator)]
            search_from = 0


def _accept_values() -> list[str]:
    return [f"{_MULTIPART}; transfer-syntax=*", _MULTIPART]


def _wado(target: DicomWebTarget, client: httpx.Client, url: str, receiver: Receiver) -> None:
    with target._translate("WADO-RS", url):
        for accept in _accept_values():
            with client.stream("GET", url, headers={"Accept": accept}) as response:
                if response.status_code in (400, 406) and "transfer-syntax" in accept:
                    continue  # the server does not do "original syntax": ask plainly
                response.raise_for_status()
                boundary = _boundary(response.headers.get("Content-Type", ""))
                for part in iter_multipart(response.iter_bytes(), boundary):
                    receiver.accept(part)
            return


def _wado_files(target: DicomWebTarget, item: RetrieveItem, receiver: Receiver) -> None:
    with target._translate("reading the folder"):
        client = target.get_file_client()
        if item.series_uid:
            datasets: Iterable[Dataset] = client.iter_series(item.study_uid, item.series_uid)
        else:
            datasets = client.iter_study(item.study_uid)
        for ds in datasets:
            buffer = io.BytesIO()
            dcmwrite(buffer, ds, enforce_file_format=True)
            receiver.accept(buffer.getvalue())


def retrieve(target: DicomWebTarget, request: RetrieveRequest) -> RetrieveResult:
    """``DicomWebTarget.retrieve``: QIDO-RS the series, then WADO-RS them into a folder."""
    begin = time.monotonic()
    accession, wanted = check_query(request.accession, request.filters, "series")
    client = None if target.is_file_url else target.get_client()
    try:
        return _retrieve(target, client, accession, wanted, request, begin)
    finally:
        if client is not None:
            client.close()


def _retrieve(
    target: DicomWebTarget,
    client: httpx.Client | None,
    accession: str,
    wanted: Filters,
    request: RetrieveRequest,
    begin: float,
) -> RetrieveResult:
    rows = _find(target, accession, wanted, "series", client)
    if not rows:
        raise not_found(accession, wanted)
    items = plan_retrieve(rows, wanted)
    receiver = Receiver.for_items(request.destination, items, request.progress, request.limits)
    base = target.service_url("wado")
    for item in items:
        if client is None:
            _wado_files(target, item, receiver)
            continue
        url = f"{base}/studies/{item.study_uid}"
        if item.series_uid:
            url += f"/series/{item.series_uid}"
        _wado(target, client, url, receiver)
    result = receiver.result(
        "WADO-RS",
        "httpx" if not target.is_file_url else "file",
        completed=len(receiver.instances),
        elapsed=time.monotonic() - begin,
    )
    return check_result(result, f"WADO-RS from {target._where(base)}")
