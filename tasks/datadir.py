"""The data directory: ``$DICOM_DISPATCH_HOME``, default ``~/.dicom-dispatch`` (no Prefect here)."""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["data_dir"]


def data_dir(create: bool = False) -> Path:
    path = Path(os.environ.get("DICOM_DISPATCH_HOME") or Path.home() / ".dicom-dispatch")
    if create:
        path.mkdir(parents=True, exist_ok=True)
    return path
