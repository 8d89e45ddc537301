"""An in-process pynetdicom C-GET SCP that sends every file of a folder, whatever is asked.

For the receiver's bounds: the instances it sends can be as large as a test needs (Orthanc's
would first have to be uploaded). Sub-operations a peer refuses are counted as failed; a
cancel or an abort ends the sending.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydicom import dcmread
from pynetdicom import AE, StoragePresentationContexts, evt
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    StudyRootQueryRetrieveInformationModelGet,
)

from .base import ListeningSCP, serving_scp

__all__ = ["GetSCP", "get_scp"]


@dataclass
class GetSCP(ListeningSCP):
    """Where the SCP listens, and the store statuses its peer answered."""

    statuses: list[int] = field(default_factory=list)


@contextmanager
def get_scp(folder: Path, *, aet: str = "GETSCP") -> Iterator[GetSCP]:
    """Serve C-GET on 127.0.0.1 (free port), sending every ``*.dcm`` of ``folder``."""
    ae = AE(ae_title=aet)
    ae.add_supported_context(StudyRootQueryRetrieveInformationModelGet)
    for cx in StoragePresentationContexts:
        ae.add_supported_context(cx.abstract_syntax, scu_role=False, scp_role=True)
    ae.dimse_timeout = 30
    ae.network_timeout = 30
    holder: dict[str, GetSCP] = {}

    def on_get(event: evt.Event) -> Iterator[Any]:
        files = sorted(folder.glob("*.dcm"))
        yield len(files)
        for path in files:
            if event.is_cancelled:
                yield 0xFE00, None
                return
            yield 0xFF00, dcmread(path)

    def on_store_answer(event: evt.Event) -> None:
        status = getattr(event, "message", None)
        if status is not None and hasattr(status, "command_set"):
            value = status.command_set.get("Status")
            if value is not None and status.command_set.CommandField == 0x8001:
                holder["scp"].statuses.append(int(value))

    with serving_scp(ae, [(evt.EVT_C_GET, on_get), (evt.EVT_DIMSE_RECV, on_store_answer)]) as port:
        holder["scp"] = GetSCP(port=port, aet=aet)
        yield holder["scp"]
