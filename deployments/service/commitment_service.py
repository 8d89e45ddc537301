"""The Storage Commitment listener of ``serve`` (parent process only), beside the cleaner.

Opened when the service starts if some DICOM target has ``storage_commitment`` on
(``blocks.commitment_listener``); a target switched on later takes effect at the next start.
A port that cannot be bound is logged and the service goes on: senders then take answers on
their own association only, and say so in the failure reason.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from pathlib import Path

from blocks.commitment_listener import commitment_listener
from blocks.errors import TargetError
from blocks.registry import alist_targets
from blocks.settings import DispatcherSettings

__all__ = ["run_commitment_listener"]

LOGGER = logging.getLogger(__name__)


async def run_commitment_listener(
    settings: Callable[[], DispatcherSettings], stop: asyncio.Event
) -> None:
    """Until ``stop``: listen for answers to this host's (and any host's) requests."""

    def folders() -> list[Path]:
        outgoing, success, error = settings().folders()
        return [outgoing, error, success]

    try:
        listener = commitment_listener(await alist_targets(), folders)
    except Exception:
        LOGGER.exception("storage commitment listener: the targets could not be read")
        return
    if listener is None:
        return
    try:
        await asyncio.to_thread(listener.__enter__)
    except TargetError as exc:
        LOGGER.error("storage commitment listener not started: %s", exc)
        return
    LOGGER.info("storage commitment listener on %s", listener.bound())
    try:
        await stop.wait()
    finally:
        listener.__exit__(None, None, None)
