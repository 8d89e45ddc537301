"""Which listener ``serve`` opens for Storage Commitment answers, built from the targets.

Only DICOM targets (plain or TLS) with ``storage_commitment`` on count; a target that sends to
the case's sender (``ip: sender``) has no fixed node to accept answers from and is left out.
Each remaining target's node may answer to ``DICOM_DISPATCH_STORAGE_COMMITMENT_AET`` (else to
the target's calling AE title) on ``DICOM_DISPATCH_STORAGE_COMMITMENT_PORT`` (``0``: never
listen). The listener itself is ``blocks._commitment_scp``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

from blocks._commitment_scp import CommitmentListener, ListenRoute
from blocks.base import DispatchTarget
from blocks.dicom import DicomTarget
from blocks.host import storage_commitment_aet, storage_commitment_port

__all__ = ["CommitmentListener", "commitment_listener"]


def commitment_listener(
    targets: Sequence[DispatchTarget], folders: Callable[[], Sequence[Path]]
) -> CommitmentListener | None:
    """The listener for ``targets`` (not started), or None when none needs one or the port
    is ``0``. ``folders()`` are searched, in order, for the case a transaction belongs to."""
    port = storage_commitment_port()
    ours = storage_commitment_aet()
    routes = [
        ListenRoute(peer, ours or peer.calling_aet, t.target_name)
        for t, peer in (
            (t, t.get_peer())
            for t in targets
            if isinstance(t, DicomTarget) and t.storage_commitment != "off" and t.ip != "sender"
        )
    ]
    if port == 0 or not routes:
        return None
    return CommitmentListener(port, routes, folders)
