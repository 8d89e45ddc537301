"""What the in-process dispatcher hands to the case runs it starts (per asyncio task).

Kept out of the flow's module on purpose: Prefect pickles a served flow's function by value,
globals included, and a ``ContextVar`` cannot be pickled; a function imported from here is
pickled by reference.
"""

from __future__ import annotations

from contextvars import ContextVar
from typing import Any

__all__ = ["loop_settings", "set_loop_settings"]

_settings: ContextVar[Any] = ContextVar("dicom_dispatch_loop_settings", default=None)


def set_loop_settings(settings: Any) -> None:
    """Settings the dispatcher already holds; valid for the current task and its children."""
    _settings.set(settings)


def loop_settings() -> Any:
    """The dispatcher's settings when running inside its loop, else None."""
    return _settings.get()
