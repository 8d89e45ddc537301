"""An in-process pynetdicom Storage SCP whose answer to every C-STORE is scriptable.

DCMTK's storescp can only succeed, refuse or abort; to prove how the sender treats warning and
failure statuses, and above all a response that never comes, the tests need a peer that answers
exactly what they tell it to, per SOP Instance UID or per arrival number.

Actions: an ``int`` is returned as the DIMSE status; ``"drop"`` holds the request without answering
for ``drop_hold`` seconds (longer than the client's DIMSE timeout), so the client sees a lost
response, and only then answers 0x0000 on an association the client has given up on.
"""

from __future__ import annotations

import socket
import threading
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from pynetdicom import evt

from .base import ListeningSCP, serving_scp, storage_scp_ae

__all__ = ["DROP", "Action", "ParrotSCP", "Received", "parrot_scp"]

DROP = "drop"
VERIFICATION = "1.2.840.10008.1.1"
Action = int | str
# Chooses the action for one C-STORE: (SOP Instance UID, 1-based arrival number) -> action.
Script = Callable[[str, int], Action]


@dataclass
class Received:
    """One C-STORE request as the SCP saw it (whatever it then answered)."""

    sop_instance_uid: str
    sop_class_uid: str
    transfer_syntax: str
    dataset_bytes: bytes
    action: Action


@dataclass
class ParrotSCP(ListeningSCP):
    """Handle on a running parrot SCP: where it listens and what it has received."""

    received: list[Received] = field(default_factory=list)
    nodelay_set: list[bool] = field(default_factory=list)

    def uids(self) -> list[str]:
        """SOP Instance UIDs in arrival order (repeats show re-sends)."""
        return [r.sop_instance_uid for r in self.received]


def _action_for(script: Script | Mapping[str, Action] | None, uid: str, number: int) -> Action:
    if script is None:
        return 0x0000
    if callable(script):
        return script(uid, number)
    return script.get(uid, 0x0000)


@contextmanager
def parrot_scp(
    script: Script | Mapping[str, Action] | None = None,
    *,
    aet: str = "PARROT",
    drop_hold: float = 1.5,
    keep_bytes: bool = False,
) -> Iterator[ParrotSCP]:
    """Run a Storage SCP on 127.0.0.1 (free port) answering C-STOREs as ``script`` says."""
    ae = storage_scp_ae(aet, VERIFICATION, timeout=30)
    ae.maximum_pdu_size = 0
    lock = threading.Lock()
    stopping = threading.Event()
    holder: dict[str, ParrotSCP] = {}

    def on_open(event: evt.Event) -> None:
        wrapper: Any = event.assoc.dul.socket
        sock: Any = wrapper.socket
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        holder["scp"].nodelay_set.append(
            bool(sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))
        )

    def on_store(event: evt.Event) -> int:
        request: Any = event.request
        uid = str(request.AffectedSOPInstanceUID)
        with lock:
            number = len(holder["scp"].received) + 1
            action = _action_for(script, uid, number)
            data = request.DataSet.getvalue() if keep_bytes else b""
            holder["scp"].received.append(
                Received(
                    sop_instance_uid=uid,
                    sop_class_uid=str(request.AffectedSOPClassUID),
                    transfer_syntax=str(event.context.transfer_syntax),
                    dataset_bytes=data,
                    action=action,
                )
            )
        if action == DROP:
            # Never answer in time: the client's DIMSE timeout fires and it aborts.
            stopping.wait(drop_hold)
            return 0x0000
        return int(action)

    with serving_scp(ae, [(evt.EVT_CONN_OPEN, on_open), (evt.EVT_C_STORE, on_store)]) as port:
        holder["scp"] = ParrotSCP(port=port, aet=aet)
        try:
            yield holder["scp"]
        finally:
            stopping.set()  # a dropped request answers now, before the server stops
