"""mercure's Folder target: copy the case into ``<folder>/<uuid4>/`` and mark it ``.complete``.

Fixes over mercure (architecture §4.1): the claim marker and our temporary files are never
copied; the copy is built in a hidden staging folder and renamed into place with ``.complete``
already inside, so a consumer never sees half a case and a failed or retried attempt leaves no
partial duplicate. Each file is read from a descriptor opened without following a link (mercure
copied what a link pointed to): a link planted in the case after the pre-send check fails the
send, naming the file.
"""

from __future__ import annotations

import fnmatch
import os
import shutil
import stat
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar

from pydantic import Field

from blocks.base import DispatchTarget, SendContext, SendResult
from blocks.errors import PermanentTargetError, TransientTargetError
from tasks.safefiles import CaseFiles

__all__ = ["FolderTarget", "case_files", "split_filter"]

STAGING_PREFIX = ".dicom-dispatch-staging-"
#: Never copied to a target: the claim marker, the atomic-write temporaries of task.json, the
#: Storage Commitment records of the case's DICOM targets (``blocks._commitment_record``).
ALWAYS_EXCLUDED = (
    ".processing",
    ".processing.*.tmp",
    ".task.json.*.tmp",
    ".storage-commitment.*",
)
_COPY_CHUNK = 1024 * 1024


def split_filter(file_filter: str | None) -> list[str]:
    """mercure's comma-separated glob list, trimmed (mercure did not trim ``"*.tags, *.json"``)."""
    return [p.strip() for p in (file_filter or "").split(",") if p.strip()]


def ignore_patterns(file_filter: str | None) -> Callable[[str, list[str]], set[str]]:
    patterns = [*ALWAYS_EXCLUDED, *split_filter(file_filter)]

    def ignore(_dir: str, names: list[str]) -> set[str]:
        return {n for n in names if any(fnmatch.fnmatch(n, p) for p in patterns)}

    return ignore


def case_files(case_dir: Path, file_filter: str | None) -> list[Path]:
    """The case's files to send, relative to ``case_dir``, sorted (Folder, SFTP, rsync).

    ``file_filter`` globs match file and folder names at any depth; the claim marker and
    ``task.json`` temporaries are always left out. Every entry that is not a folder is listed,
    a link too: opening it with :class:`~tasks.safefiles.CaseFiles` is what refuses it.
    """
    ignore = ignore_patterns(file_filter)
    found: list[Path] = []
    for top, dirs, names in os.walk(case_dir):
        skipped = ignore(top, [*dirs, *names])
        dirs[:] = sorted(d for d in dirs if d not in skipped)
        base = Path(top).relative_to(case_dir)
        found.extend(base / n for n in names if n not in skipped)
    return sorted(found)


class FolderTarget(DispatchTarget):
    """Copies each case into a new ``<folder>/<uuid4>/`` folder that contains ``.complete``."""

    _block_type_name = "Folder Target"
    _block_type_slug = "folder-target"
    _description = "mercure's Folder target: copies each case into a new folder."
    target_type: ClassVar[str] = "folder"
    _example_document = "research-share"
    _example_probes = False

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
            staging.mkdir()
            size = 0
            files = case_files(context.case_dir, self.file_filter)
            for rel in files:
                size += _copy_one(context.files, rel, staging / rel)
            (staging / ".complete").touch()
            os.rename(staging, final)
        except OSError as exc:
            shutil.rmtree(staging, ignore_errors=True)
            reason = f"folder target {self.target_name or self.folder}: {exc.strerror or exc}"
            transient = exc.errno in (28, 122)  # ENOSPC, EDQUOT: may clear up
            raise (TransientTargetError if transient else PermanentTargetError)(reason) from None
        return SendResult(files=len(files), bytes=size, detail=f"copied to {final}")

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


def _copy_one(files: CaseFiles, rel: Path, dest: Path) -> int:
    """Copy one case file, read from its no-follow descriptor, with its mode and times (as
    ``copytree`` did); its size."""
    with files.open(rel) as source:
        info = os.fstat(source.fileno())
        dest.parent.mkdir(parents=True, exist_ok=True)
        with dest.open("xb") as out:
            shutil.copyfileobj(source, out, _COPY_CHUNK)
    os.chmod(dest, stat.S_IMODE(info.st_mode))
    os.utime(dest, ns=(info.st_atime_ns, info.st_mtime_ns))
    return info.st_size
