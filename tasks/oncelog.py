"""Say a problem of a folder entry once, not on every scan.

The dispatcher scans outgoing/ every second and the cleaner success/ every interval; an entry
that stays broken until a person acts (a folder the service cannot write, a planted marker)
would otherwise fill the log with one line per scan. What was said is kept per path and
reason, and forgotten once nothing is at the path any more, so a new entry under the same
name is reported again. Pure: imports nothing of ours.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

__all__ = ["OnceLog"]


class OnceLog:
    """A logger's memory of what it has said about which entry."""

    def __init__(self, logger: logging.Logger) -> None:
        self._logger = logger
        self._said: set[tuple[Path, str]] = set()

    def log(self, level: int, path: Path, reason: str, msg: str, *args: Any) -> bool:
        """Log ``msg % args`` unless ``reason`` was logged for ``path`` already; True if logged."""
        if (path, reason) in self._said:
            return False
        self._said.add((path, reason))
        self._logger.log(level, msg, *args)
        return True

    def forget(self, path: Path) -> None:
        """``path``'s problems may be said again (it was fixed, or moved away)."""
        self._said = {said for said in self._said if said[0] != path}

    def forget_gone(self) -> None:
        """Forget what was said about entries that are no longer there."""
        self._said = {said for said in self._said if os.path.lexists(said[0])}
