"""The base of every target block: settings + credentials + the verbs that use them.

As prefect-aws's ``S3Bucket`` owns ``upload_from_path``, a target block owns ``send`` and
``test_connection``; the flows only load a block by the target's mercure name and call a verb, so
no secret ever travels as a run parameter.
"""

from __future__ import annotations

import logging
import re
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Literal

from prefect.blocks.core import Block
from pydantic import Field

from blocks.errors import PermanentTargetError
from tasks.safefiles import CaseFiles
from tasks.taskjson import Task

if TYPE_CHECKING:
    from blocks.qr import Level, Progress, ReceiveLimits, RetrieveResult

__all__ = [
    "CaseOrigin",
    "DispatchTarget",
    "QueryTarget",
    "RetrieveRequest",
    "SendContext",
    "SendResult",
    "ca_bundle_verify",
    "target_slug",
]

_SLUG_JUNK = re.compile(r"[^a-z0-9]+")


def ca_bundle_verify(ca_bundle: str, where: str) -> str | bool:
    """What an HTTPS client's ``verify`` gets for a target's ``ca_bundle`` setting: the file
    (checked now, so a wrong path is a clear error, not a TLS failure later) or ``True`` (the
    system's CA store). Never ``False``: no target runs with verification off."""
    if not ca_bundle:
        return True
    if not Path(ca_bundle).is_file():
        raise PermanentTargetError(f"{where}: ca_bundle {ca_bundle} is not a readable file")
    return ca_bundle


def target_slug(name: str) -> str:
    """The block document name for a mercure target name (``PACS_Main`` → ``pacs-main``).

    Prefect accepts only lowercase letters, digits and dashes in document names.
    """
    slug = _SLUG_JUNK.sub("-", name.lower()).strip("-")
    return slug or "target"


@dataclass(frozen=True)
class SendContext:
    """What a target needs to know about the case it sends."""

    case_dir: Path
    task: Task
    #: dcmsend-format report to write (DICOM-type targets), ``None`` for the others.
    report_path: Path | None = None
    #: The site's ``case_links_inside``: a link that stays inside the case is sent as its file.
    links_inside: bool = False

    @property
    def task_id(self) -> str:
        return self.task.id

    @property
    def files(self) -> CaseFiles:
        """How a sender opens the case's files: at send time, never through a link planted
        after the pre-send check (a link is an ``OSError`` naming the file)."""
        return CaseFiles(self.case_dir, self.links_inside)


@dataclass(frozen=True)
class RetrieveRequest:
    """One :meth:`QueryTarget.retrieve` call, as the type's protocol gets it (``_retrieve``)."""

    accession: str
    filters: dict[str, Any] | None
    destination: Path
    progress: Progress | None = None
    limits: ReceiveLimits | None = None


@dataclass
class SendResult:
    """What was delivered; becomes the per-target line of the case's artifact."""

    files: int = 0
    bytes: int = 0
    detail: str = ""
    extra: dict[str, Any] = field(default_factory=dict)


class DispatchTarget(Block, ABC):
    """Common fields of every mercure target type, and the verbs each type implements."""

    #: mercure's ``target_type`` discriminator (``"dicom"``, ``"folder"``, ...).
    target_type: ClassVar[str]
    #: The document name the code example loads (``"pacs-main"``), and whether the example goes
    #: on to probe the target (the types that reach another host).
    _example_document: ClassVar[str] = "target"
    _example_probes: ClassVar[bool] = True

    target_name: str = Field(
        default="",
        description="The target's name as task.json and mercure.json use it (e.g. PACS_Main).",
    )
    contact: str | None = Field(default="", description="Who to call about this target.")
    comment: str = Field(default="", description="Free text shown with the target.")
    direction: Literal["push", "pull", "both"] = Field(
        default="push", description="Whether cases are sent to it, queried from it, or both."
    )
    max_concurrent_sends: int | None = Field(
        default=None,
        description="At most this many sends to this target at once (0 or empty: no limit).",
    )

    @classmethod
    def get_code_example(cls) -> str:
        """The example on the block type's page: import, load by document name, probe. Rendered
        here rather than written in each docstring, so the types' examples cannot drift apart
        (each still names its own module and class)."""
        probe = "\n\ntarget.test_connection()" if cls._example_probes else ""
        return (
            f"```python\nfrom {cls.__module__} import {cls.__name__}\n\n"
            f'target = {cls.__name__}.load("BLOCK_NAME")  # e.g. "{cls._example_document}"'
            f"{probe}\n```"
        )

    @property
    def logger(self) -> logging.Logger | logging.LoggerAdapter[logging.Logger]:
        """The run logger inside a flow or task run, a module logger outside."""
        try:
            from prefect.logging import get_run_logger

            return get_run_logger()
        except Exception:
            return logging.getLogger(f"dicom_dispatch.{type(self).__name__}")

    @abstractmethod
    def send(self, context: SendContext) -> SendResult:
        """Deliver the case; raise a :class:`~blocks.errors.TargetError` if it did not arrive."""

    @abstractmethod
    def test_connection(self) -> dict[str, Any]:
        """Probe the target; returns mercure's keys for this type (all true = usable)."""

    def import_warnings(self) -> list[str]:
        """What ``import-config`` warns about this target (settings that now fail, ...)."""
        return []

    @staticmethod
    def connection_ok(result: dict[str, Any]) -> bool:
        """A test result is usable when every boolean it reports is true."""
        return all(v for v in result.values() if isinstance(v, bool))

    @property
    def writes_dcmsend_report(self) -> bool:
        """DICOM-type targets write a dcmsend-format ``sent.txt``."""
        return False

    def backends(self) -> dict[str, str]:
        """Which program moves the files, for types that have a choice (``targets test``)."""
        return {}


@dataclass(frozen=True)
class CaseOrigin:
    """Where a retrieved study came from, as mercure's router records a sender in task.json."""

    address: str
    sender_aet: str
    receiver_aet: str


class QueryTarget(DispatchTarget):
    """A target that can also be queried and retrieved from (DICOM and DICOMweb nodes).

    ``find`` and ``retrieve`` are one contract for every type: the checks they share are made
    here, once; a type implements only its protocol (``_find``, ``_retrieve``).
    """

    def find(
        self,
        accession: str,
        filters: dict[str, Any] | None = None,
        level: Literal["study", "series"] = "series",
    ) -> list[dict[str, Any]]:
        """Series (or studies) of ``accession`` matching ``filters`` (keyword → value or list of
        values), keyed by DICOM keywords. Needs ``direction`` pull or both."""
        from blocks.qr import check_pull  # blocks.qr loads pydicom: only when a node is queried

        check_pull(self)
        return self._find(accession, filters, level)

    def retrieve(
        self,
        accession: str,
        filters: dict[str, Any] | None,
        destination: Path,
        progress: Progress | None = None,
        limits: ReceiveLimits | None = None,
    ) -> RetrieveResult:
        """Fetch what :meth:`find` finds into ``destination`` as ``<SOPInstanceUID>.dcm``,
        within ``limits`` (object size, free space; default ``ReceiveLimits()``)."""
        from blocks.qr import check_pull

        check_pull(self)
        return self._retrieve(RetrieveRequest(accession, filters, destination, progress, limits))

    @abstractmethod
    def _find(
        self, accession: str, filters: dict[str, Any] | None, level: Level
    ) -> list[dict[str, Any]]:
        """:meth:`find` in the type's protocol."""

    @abstractmethod
    def _retrieve(self, request: RetrieveRequest) -> RetrieveResult:
        """:meth:`retrieve` in the type's protocol."""

    @abstractmethod
    def case_origin(self) -> CaseOrigin:
        """The sender a case retrieved from this node records (``task.json`` ``info``)."""


def dicom_files(case_dir: Path) -> list[Path]:
    """The ``*.dcm`` files of a case, recursively and in a stable order (dcmsend ``+r +sd``)."""
    return sorted(p for p in case_dir.rglob("*.dcm") if p.is_file())
