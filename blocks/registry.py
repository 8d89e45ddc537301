"""Every block type of dicom-dispatch, and how a target is found by its mercure name.

``task.json`` names targets as mercure does (``PACS_Main``); the block document is stored under
the slug of that name (``pacs-main``), in whichever target block type it has. Finding it is one
filtered API call across our target types; the result is cached for ``CACHE_SECONDS`` so a
stream of cases does not reload the same block for every case (a reload costs the Prefect server
more than a whole case's other calls). A changed block is seen within that time — as the
service's settings are (``SETTINGS_REFRESH_SECONDS``) and as mercure re-reads its configuration
between attempts; ``forget_cached_targets()`` (the import calls it) drops it at once.
"""

from __future__ import annotations

import time
from typing import Any

from prefect.client.orchestration import PrefectClient, get_client
from prefect.client.schemas.objects import BlockDocument
from prefect.exceptions import ObjectNotFound

from blocks.base import DispatchTarget, target_slug
from blocks.dicom import DicomTarget, DicomTLSTarget
from blocks.dicomweb import DicomWebTarget
from blocks.dummy import DummyTarget
from blocks.errors import ConfigError
from blocks.folder import FolderTarget
from blocks.notifications import SmtpEmailNotification, SmtpServer
from blocks.prefect_internals import api_post, block_from_document, block_name
from blocks.rsync import RsyncTarget
from blocks.s3 import S3Target
from blocks.settings import DEFAULT_SETTINGS_NAME, DispatcherSettings
from blocks.sftp import SftpTarget
from blocks.xnat import XnatTarget

__all__ = [
    "ALL_BLOCK_TYPES",
    "NOT_YET_SUPPORTED",
    "TARGET_TYPES",
    "aload_settings",
    "aload_target",
    "alist_targets",
    "aregister_block_types",
    "aremove_other_types",
    "forget_cached_targets",
]

#: Every target block class (one per mercure target type).
TARGET_CLASSES: tuple[type[DispatchTarget], ...] = (
    DicomTarget,
    DicomTLSTarget,
    DicomWebTarget,
    FolderTarget,
    SftpTarget,
    RsyncTarget,
    S3Target,
    XnatTarget,
    DummyTarget,
)
#: mercure ``target_type`` → block class.
TARGET_TYPES: dict[str, type[DispatchTarget]] = {cls.target_type: cls for cls in TARGET_CLASSES}
_BY_SLUG: dict[str, type[DispatchTarget]] = {
    cls.get_block_type_slug(): cls for cls in TARGET_TYPES.values()
}
#: mercure target types this version cannot send to yet (reported, never a crash).
NOT_YET_SUPPORTED: set[str] = set()
ALL_BLOCK_TYPES: tuple[type[Any], ...] = (
    *TARGET_TYPES.values(),
    DispatcherSettings,
    SmtpServer,
    SmtpEmailNotification,
)

CACHE_SECONDS = 15.0
_cache: dict[str, tuple[float, DispatchTarget]] = {}


async def aregister_block_types(client: PrefectClient | None = None) -> None:
    """Register (or update) every block type and schema on the API, so the UI can edit them."""
    async with _client(client) as c:
        for cls in ALL_BLOCK_TYPES:
            await cls.register_type_and_schema(client=c)


async def _read_target_documents(
    client: PrefectClient, names: list[str] | None = None
) -> list[BlockDocument]:
    body: dict[str, Any] = {
        "block_types": {"slug": {"any_": list(_BY_SLUG)}},
        "include_secrets": True,
        "limit": 200,
    }
    if names is not None:
        body["block_documents"] = {"name": {"any_": names}, "is_anonymous": {"eq_": False}}
    response = await api_post(client, "/block_documents/filter", body)
    response.raise_for_status()
    return [BlockDocument.model_validate(d) for d in response.json()]


def _from_document(doc: BlockDocument) -> DispatchTarget:
    slug = doc.block_type.slug if doc.block_type else ""
    return block_from_document(_BY_SLUG[slug], doc)


async def aload_target(name: str, client: PrefectClient | None = None) -> DispatchTarget:
    """The target block for a mercure target name; :class:`ConfigError` if there is none."""
    hit = _cache.get(name)
    if hit and time.monotonic() - hit[0] < CACHE_SECONDS:
        return hit[1]
    async with _client(client) as c:
        docs = await _read_target_documents(c, [target_slug(name)])
    targets = [t for t in map(_from_document, docs) if (t.target_name or doc_name(t)) == name]
    if not targets:
        raise ConfigError(f"Settings for target {name} incorrect: no such target")
    _cache[name] = (time.monotonic(), targets[0])
    return targets[0]


async def aremove_other_types(
    slug: str, keep: type[DispatchTarget], client: PrefectClient | None = None
) -> None:
    """Delete documents named ``slug`` of every target type but ``keep``.

    Target names are unique across types: when a target changes type, the old document must
    go, or a lookup could find either.
    """
    async with _client(client) as c:
        for cls in TARGET_CLASSES:
            if cls is keep:
                continue
            try:
                doc = await c.read_block_document_by_name(slug, cls.get_block_type_slug())
            except ObjectNotFound:
                continue
            await c.delete_block_document(doc.id)
    forget_cached_targets()


def doc_name(block: DispatchTarget) -> str:
    return block_name(block)


def forget_cached_targets() -> None:
    _cache.clear()


async def alist_targets(client: PrefectClient | None = None) -> list[DispatchTarget]:
    async with _client(client) as c:
        docs = await _read_target_documents(c)
    return [_from_document(d) for d in docs if d.block_type and d.block_type.slug in _BY_SLUG]


async def aload_settings(name: str = DEFAULT_SETTINGS_NAME) -> DispatcherSettings:
    """The named settings document, or the defaults when there is none."""
    try:
        return await DispatcherSettings.aload(name)
    except ValueError:
        return DispatcherSettings()


class _client:
    """Use the caller's client, or open one for the duration of the call."""

    def __init__(self, client: PrefectClient | None) -> None:
        self._given = client
        self._owned: Any = None

    async def __aenter__(self) -> PrefectClient:
        if self._given is not None:
            return self._given
        self._owned = get_client()
        return await self._owned.__aenter__()  # type: ignore[no-any-return]

    async def __aexit__(self, *exc: object) -> None:
        if self._owned is not None:
            await self._owned.__aexit__(*exc)
