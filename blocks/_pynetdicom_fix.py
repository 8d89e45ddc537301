"""pynetdicom as this project needs it, applied on import: the reactor-race fix and privacy.

Every DICOM association of the project is opened through ``blocks._association``, which
imports this module, so no association runs without it. Prefect-free.

* Identifiers of C-FIND/C-MOVE requests and responses carry patient data: they are kept out of
  pynetdicom's logs.
* pynetdicom 3.0.4 can lose DIMSE responses to its own reactor thread; see
  :func:`_patch_reactor_race`.
"""

from __future__ import annotations

import logging
import queue
from collections.abc import Callable
from typing import Any

import pynetdicom
from pynetdicom import _config

__all__ = ["REACTOR_RACE_FIXED", "patch_method"]

LOGGER = logging.getLogger(__name__)

_config.LOG_REQUEST_IDENTIFIERS = False
_config.LOG_RESPONSE_IDENTIFIERS = False

_PATCH_MARK = "_dicom_dispatch_reactor_fix"
#: The pynetdicom release our patches were read against; on any other they are not applied.
PATCHED_RELEASE = "3.0.4"


def patch_method(
    owner: Any,
    name: str,
    mark: str,
    wrap: Callable[[Callable[..., Any]], Callable[..., Any]],
    otherwise: str,
) -> bool:
    """Replace ``owner.name`` by ``wrap(original)``, once (``mark`` flags the replacement), and
    only on :data:`PATCHED_RELEASE`: elsewhere log ``otherwise`` (what that costs) and leave
    it. Returns whether the patch is in place."""
    current = getattr(owner, name)
    if getattr(current, mark, False):
        return True
    if pynetdicom.__version__ != PATCHED_RELEASE:
        LOGGER.warning(
            "pynetdicom %s is not %s: %s", pynetdicom.__version__, PATCHED_RELEASE, otherwise
        )
        return False
    replacement = wrap(current)
    setattr(replacement, mark, True)
    replacement.__doc__ = current.__doc__
    setattr(owner, name, replacement)
    return True


def _patch_reactor_race() -> bool:
    """Stop the association reactor from stealing responses meant for ``send_*()``.

    In pynetdicom 3.0.4 ``Association._run_reactor()`` sets ``_is_paused = True``, leaves
    ``_reactor_checkpoint.wait()``, sets ``_is_paused = False`` and calls
    ``dimse.get_msg(block=False)``. ``send_c_store()`` clears the checkpoint and spins until
    ``_is_paused`` is true; if it reads true inside that window, both proceed and the reactor can
    take the C-STORE response off the queue ("Received unexpected C-STORE service message"), so
    ``send_c_store()`` hits its DIMSE timeout and returns an empty status (pydicom/pynetdicom
    #842, #850, #875; measured here in 20 of 180 sends).

    Fix: the reactor's *non-blocking* ``get_msg`` returns nothing while the checkpoint is cleared
    (a ``send_*()`` owns the queue then). A message taken just before the checkpoint was cleared
    is put back at the head of the queue, so the waiting ``send_*()`` still gets it. Blocking
    calls (the ``send_*()`` side) are unchanged. Idempotent; applied only to 3.0.4, the version
    this was analysed on. Returns whether the patch is in place.
    """
    from pynetdicom.dimse import DIMSEServiceProvider

    return patch_method(
        DIMSEServiceProvider,
        "get_msg",
        _PATCH_MARK,
        _reactor_safe_get_msg,
        "reactor race fix not applied, check upstream #842",
    )


def _reactor_safe_get_msg(original: Callable[..., Any]) -> Callable[..., Any]:
    def get_msg(self: Any, block: bool = False) -> tuple[int | None, Any]:
        if block:
            result: tuple[int | None, Any] = original(self, block=True)
            return result
        checkpoint = self.assoc._reactor_checkpoint
        if not checkpoint.is_set():
            return None, None
        msg_queue: queue.Queue[Any] = self.msg_queue
        try:
            item = msg_queue.get(block=False)
        except queue.Empty:
            return None, None
        if not checkpoint.is_set():
            # A send_*() paused the reactor while we took this: it is that call's response.
            with msg_queue.mutex:
                msg_queue.queue.appendleft(item)
                msg_queue.not_empty.notify()
            return None, None
        return item  # type: ignore[no-any-return]

    return get_msg


REACTOR_RACE_FIXED = _patch_reactor_race()
