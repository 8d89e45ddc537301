"""Which program moves a DICOM target's files: what ``backend="auto"`` resolves to, and why.

DCMTK's ``dcmsend`` sends a case several times faster than pynetdicom from one process (pure-
Python PDU encoding under the GIL: 200 × 0.5 MB in ≈ 0.25 s against ≈ 1.3 s on loopback), and
``getscu``/``movescu`` receive faster than pynetdicom's Storage SCP. Both backends give the same
per-instance statuses, the same dcmsend-format ``sent.txt`` and the same success rule, and both
set ``TCP_NODELAY``. ``auto`` therefore takes DCMTK whenever it is installed and can do what the
target asks, and pynetdicom where only pynetdicom can:

* **TLS** (DICOM+TLS targets): ``dcmsend`` has no TLS → pynetdicom.
* **``preferred_transfer_syntax``**: ``dcmsend`` cannot encode → pynetdicom.
* **``max_associations`` > 1**: ``dcmsend`` opens one association; the setting asks for several
  in parallel (which is what hides a peer's delayed ACKs) → pynetdicom, which honours it.
* ``warning_counts_as_sent`` on or off: both backends apply it to every instance's status → DCMTK.
* A lost C-STORE response: a pynetdicom 3.0.4 fault (patched in ``blocks._pynetdicom_fix``, and
  an empty status is retried); DCMTK does not lose responses, and a DIMSE timeout is transient
  there as well → DCMTK.
* **C-MOVE bound to one address** (``move_listen_address`` set): ``movescu`` listens on every
  interface and cannot bind one → pynetdicom.

Prefect-free; found by absolute path (``blocks._dcmsend.find_dcmsend``,
``blocks._dcmtk_qr.dcmtk_tool``), since pynetdicom puts same-named scripts on a venv's ``PATH``.
"""

from __future__ import annotations

from typing import Literal

from blocks._dcmsend import find_dcmsend
from blocks._dcmtk_qr import dcmtk_tool

__all__ = [
    "RetrieveBackend",
    "SendBackend",
    "retrieve_backend",
    "send_backend",
]

SendBackend = Literal["pynetdicom", "dcmsend"]
RetrieveBackend = Literal["pynetdicom", "dcmtk"]
#: ``move_listen_address`` values that mean "every interface", which movescu can do.
_ANY_ADDRESS = ("", "0.0.0.0", "::")


def send_backend(
    choice: str, *, tls: bool, associations: int, preferred: bool = False
) -> SendBackend:
    """The backend a send uses: ``choice`` itself unless it is ``auto`` (module docstring)."""
    if choice == "dcmsend":
        return "dcmsend"
    if choice != "auto" or tls or associations > 1 or preferred:
        return "pynetdicom"
    return "dcmsend" if find_dcmsend() is not None else "pynetdicom"


def retrieve_backend(choice: str, *, method: str, listen_address: str) -> RetrieveBackend:
    """The backend a retrieve uses: ``choice`` itself unless it is ``auto`` (module docstring)."""
    if choice == "dcmtk":
        return "dcmtk"
    if choice != "auto" or (method == "move" and listen_address not in _ANY_ADDRESS):
        return "pynetdicom"
    tool = "getscu" if method == "get" else "movescu"
    return "dcmtk" if dcmtk_tool(tool) is not None else "pynetdicom"
