"""At most N associations to one DICOM node from this process; the others wait before connecting.

Many PACS (and DCMTK ``storescp`` without ``--fork``) serve one association at a time. A second
association opened meanwhile is accepted by the kernel and then waits in the listen backlog for
its A-ASSOCIATE-AC: after the ACSE timeout it fails and is retried, so cases sent in parallel end
up slower than one after the other. The gate makes them wait *before* connecting instead, so a
wait costs nothing but the wait. It guards the transfer only: a case's orchestration (flow run,
task run, tag-limit leases, status writes) still runs in parallel with other cases' transfers.

Keyed by (host, port, called AE title): two target blocks naming the same node share the gate.
Sends run in worker threads (``anyio.to_thread``), hence threading semaphores. Prefect-free.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator

__all__ = ["peer_gate"]

_lock = threading.Lock()
_gates: dict[tuple[str, int, str], tuple[int, threading.BoundedSemaphore]] = {}


def _gate(key: tuple[str, int, str], size: int) -> threading.BoundedSemaphore:
    with _lock:
        held = _gates.get(key)
        if held is None or held[0] != size:  # a changed size applies to new senders
            held = _gates[key] = (size, threading.BoundedSemaphore(size))
        return held[1]


@contextlib.contextmanager
def peer_gate(host: str, port: int, called_aet: str, size: int) -> Iterator[None]:
    """Hold one of ``size`` slots for the node while the block runs (``size`` ≥ 1)."""
    gate = _gate((host, port, called_aet), max(1, size))
    with gate:
        yield
