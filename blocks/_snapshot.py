"""The private snapshot a program that opens files by name sends (dcmsend, rsync).

Such a program would follow a link planted in the case folder at any moment, so it is given a
private copy of the case instead (``tasks.safefiles.private_snapshot``); this module only puts
the snapshot's failures into the error tree: a file that cannot be read as a regular file (a
link, a FIFO) fails the send permanently, naming it; a full temporary folder is transient.
Prefect-free.
"""

from __future__ import annotations

import contextlib
import errno
from collections.abc import Iterator, Sequence
from pathlib import Path

from blocks.errors import PermanentTargetError, TransientTargetError
from tasks.safefiles import CaseFiles, private_snapshot

__all__ = ["case_snapshot"]


@contextlib.contextmanager
def case_snapshot(case: CaseFiles, names: Sequence[Path], where: str) -> Iterator[Path]:
    """:func:`~tasks.safefiles.private_snapshot` of ``names``; its ``OSError`` a TargetError."""
    with contextlib.ExitStack() as stack:
        try:
            snapshot = stack.enter_context(private_snapshot(case, names))
        except OSError as exc:
            transient = exc.errno in (errno.ENOSPC, errno.EDQUOT)  # the temporary folder is full
            raise (TransientTargetError if transient else PermanentTargetError)(
                f"{where}: cannot read the case: {exc.strerror or exc}"
            ) from None
        yield snapshot
