"""C-STORE data sets of our receivers written to disk as they arrive, never held in memory.

pynetdicom collects a received data set in a ``BytesIO`` (all of it, however large) before the
C-STORE handler sees it. Its ``_config.STORE_RECV_CHUNKED_DATASET`` writes to a temporary file
instead, but process-wide, to the system's temporary folder, with no bound. Here an association
carries a *spool factory* (:func:`spool_into`, our :class:`~blocks._receiver.Receiver`): when a
C-STORE request's command set has arrived, the factory opens the file the data set fragments are
written to as they come (in the retrieve's folder, bounded in size and by free space), and the
handler finds it as the request's ``_dataset_file`` / ``_dataset_path``, as with pynetdicom's
own option. Associations without a factory are untouched. Prefect-free.

The hook wraps ``DIMSEMessage.decode_msg`` and feeds it one PDV at a time, so the file is in
place before the first data set fragment; applied only to pynetdicom 3.0.4, the version this was
read against (elsewhere data sets stay in memory and the receiver checks their size after).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any, Protocol

from pynetdicom.dimse_messages import C_STORE_RQ, DIMSEMessage
from pynetdicom.pdu_primitives import P_DATA

from blocks._pynetdicom_fix import patch_method

__all__ = ["SPOOL_PATCHED", "SpoolFactory", "spool_into"]

LOGGER = logging.getLogger(__name__)

_ATTR = "_dicom_dispatch_spool"
_PATCH_MARK = "_dicom_dispatch_spool_patch"
_NO_DATA_SET = 0x0101


class SpoolFactory(Protocol):
    """Opens the file one C-STORE data set is written to (``write``, ``file.flush``, ``close``,
    ``name``: what pynetdicom uses of its own temporary file)."""

    def spool(self, sop_class_uid: str, sop_instance_uid: str, transfer_syntax: str) -> Any: ...


def spool_into(assoc: Any, factory: SpoolFactory) -> None:
    """Write the data sets received on ``assoc`` through ``factory`` from now on."""
    setattr(assoc, _ATTR, factory)


def _patch() -> bool:
    return patch_method(
        DIMSEMessage,
        "decode_msg",
        _PATCH_MARK,
        _spooling_decode_msg,
        "received data sets are held in memory",
    )


def _spooling_decode_msg(original: Callable[..., bool]) -> Callable[..., bool]:
    def decode_msg(self: Any, primitive: P_DATA, assoc: Any = None) -> bool:
        factory = getattr(assoc, _ATTR, None) if assoc is not None else None
        if factory is None or not isinstance(primitive, P_DATA):
            return original(self, primitive, assoc)
        for pdv in primitive.presentation_data_value_list:
            one = P_DATA()
            one._presentation_data_value_list = [pdv]  # as received (the setter wants lists)
            if original(self, one, assoc):
                return True
            if (
                isinstance(self, C_STORE_RQ)  # the command set is complete: a data set follows
                and self._data_set_file is None
                and self.command_set.CommandDataSetType != _NO_DATA_SET
            ):
                command = self.command_set
                context = assoc._accepted_cx[self.context_id]
                spool = factory.spool(
                    str(command.AffectedSOPClassUID),
                    str(command.AffectedSOPInstanceUID),
                    str(context.transfer_syntax[0]),
                )
                self._data_set_file = spool
                self._data_set_path = spool.path
        return False

    return decode_msg


#: Whether received data sets go to disk as they arrive (the hook is in place).
SPOOL_PATCHED = _patch()
