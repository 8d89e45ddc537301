"""mercure's Folder target: copy the case into ``<folder>/<uuid4>/`` and mark it ``.complete``.

Fixes over mercure (architecture §4.1): the claim marker and our temporary files are never
copied; the copy is built in a hidden staging folder and renamed into place with ``.complete``
already inside, so a consumer never sees half a case and a failed or retried attempt leaves no
partial duplicate.
"""

from __future__ import annotations

import fnmatch
import os
import shutil
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar

from pydantic import Field

from blocks.base import DispatchTarget, SendContext, SendResult
from blocks.errors import PermanentTargetError, TransientTargetError

__all__ = ["FolderTarget", "split_filter"]

STAGING_PREFIX = ".dicom-dispatch-staging-"
#: Never copied to a target: the claim marker and the atomic-write temporaries of task.json.
ALWAYS_EXCLUDED = (".processing", ".processing.*.tmp", ".task.json.*.tmp")


def split_filter(file_filter: str | None) -> list[str]:
    """mercure's comma-separated glob list, trimmed (mercure did not trim ``"*.tags, *.json"``)."""
    return [p.strip() for p in (file_filter or "").split(",") if p.strip()]


def ignore_patterns(file_filter: str | None) -> Callable[[str, list[str]], set[str]]:
    patterns = [*ALWAYS_EXCLUDED, *split_filter(file_filter)]

    def ignore(_dir: str, names: list[str]) -> set[str]:
        return {n for n in names if any(fnmatch.fnmatch(n, p) for p in patterns)}

    return ignore


class FolderTarget(DispatchTarget):
    """Copies each case into a new ``<folder>/<uuid4>/`` folder that contains ``.complete``.

    Example:
        ```python
        from blocks.folder import FolderTarget

        FolderTarget.load("research-share")
        ```
    """

    _block_type_name = "Folder Target"
    _block_type_slug = "folder-target"
    _description = "mercure's Folder target: copies each case into a new folder."
    target_type: ClassVar[str] = "folder"

    folder: str = Field(description="Folder that receives one sub-folder per case.")
    file_filter: str | None = Field(
        default=None,
        description="Comma-separated glob patterns of files not to copy (e.g. *.tags,task.json).",
    )

    def send(self, context: SendContext) -> SendResult:
        root = Path(self.folder)
        staging = root / f"{STAGING_PREFIX}{context.case_dir.name}"
        final = root / str(uuid.uuid4())
        try:
            root.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(staging, ignore_errors=True)  # leftovers of a crashed attempt
            shutil.copytree(context.case_dir, staging, ignore=ignore_patterns(self.file_filter))
            (staging / ".complete").touch()
            os.rename(staging, final)
        except OSError as exc:
            shutil.rmtree(staging, ignore_errors=True)
            reason = f"folder target {self.target_name or self.folder}: {exc.strerror or exc}"
            transient = exc.errno in (28, 122)  # ENOSPC, EDQUOT: may clear up
            raise (TransientTargetError if transient else PermanentTargetError)(reason) from None
        sizes = [p.stat().st_size for p in final.rglob("*") if p.is_file()]
        return SendResult(files=len(sizes), bytes=sum(sizes), detail=f"copied to {final}")

    def test_connection(self) -> dict[str, Any]:
        root = Path(self.folder)
        exists = root.is_dir()
        writeable = False
        if exists:
            probe = root / ".test"
            try:
                probe.touch()
                probe.unlink()
                writeable = True
            except OSError:
                writeable = False
        return {"Folder exists": exists, "Folder is writeable": writeable}
