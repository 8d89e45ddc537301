"""An in-process pynetdicom Storage SCP that counts what the limits are about, from its side.

It records every C-STORE's SOP Instance UID and the most associations it ever had open at once
(accepted and not yet released or aborted): what a receiver observes, whatever the senders
believe. An optional ``gate`` holds every C-STORE until it is set (a send "in flight").
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from pynetdicom import evt

from .base import ListeningSCP, serving_scp, storage_scp_ae

__all__ = ["CountingSCP", "counting_scp"]


@dataclass
class CountingSCP(ListeningSCP):
    uids: list[str] = field(default_factory=list)
    open_now: int = 0
    max_open: int = 0
    gate: threading.Event | None = None


@contextmanager
def counting_scp(
    aet: str = "COUNTER", gate: threading.Event | None = None, port: int = 0
) -> Iterator[CountingSCP]:
    ae = storage_scp_ae(aet, timeout=120)
    ae.maximum_associations = 64
    lock = threading.Lock()
    holder: dict[str, CountingSCP] = {}

    def opened(event: evt.Event) -> None:
        with lock:
            scp = holder["scp"]
            scp.open_now += 1
            scp.max_open = max(scp.max_open, scp.open_now)

    def closed(event: evt.Event) -> None:
        with lock:
            holder["scp"].open_now -= 1

    def store(event: evt.Event) -> int:
        if gate is not None:
            gate.wait(300)
        request: Any = event.request
        with lock:
            holder["scp"].uids.append(str(request.AffectedSOPInstanceUID))
        return 0x0000

    handlers = [
        (evt.EVT_ACCEPTED, opened),
        (evt.EVT_RELEASED, closed),
        (evt.EVT_ABORTED, closed),
        (evt.EVT_C_STORE, store),
    ]
    with serving_scp(ae, handlers, port) as bound:
        holder["scp"] = CountingSCP(port=bound, aet=aet, gate=gate)
        try:
            yield holder["scp"]
        finally:
            if gate is not None:
                gate.set()  # before the server stops: no C-STORE is left waiting on it
