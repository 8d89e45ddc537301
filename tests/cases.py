"""Build mercure case folders (task.json + DICOM files) for the tests and the benchmark."""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tasks.taskjson import new_task
from tests.dicomfiles import make_ct_series

__all__ = ["make_case", "nest_first_file", "task_json", "write_case"]


def task_json(
    case_id: str,
    targets: list[str] | str,
    *,
    acc: str = "ACC0001",
    mrn: str = "MRN0001",
    applied_rule: str = "",
    triggered_rules: dict[str, bool] | None = None,
    sender_address: str = "127.0.0.1",
    sender_aet: str = "SENDER",
    receiver_aet: str = "RECEIVER",
) -> dict[str, Any]:
    """A task.json as mercure's router writes it (reference §2.7)."""
    task = new_task(
        case_id,
        targets,
        uid="1.2.826.0.1.3680043.8.498.1",
        triggered_rules=triggered_rules if triggered_rules is not None else {"rule": True},
        applied_rule=applied_rule,
        patient_name="TEST^PATIENT",
        mrn=mrn,
        acc=acc,
        sender_address=sender_address,
        mercure_version="0.4.1",
        mercure_appliance="master",
        mercure_server="mercure-01",
        sender_aet=sender_aet,
        receiver_aet=receiver_aet,
    )
    for status in task["dispatch"]["status"].values():
        status["time"] = "2026-01-01 10:00:00"
    return task


def write_case(
    folder: Path,
    *,
    task: dict[str, Any] | None = None,
    text: str | None = None,
    files: Callable[[Path], object] | None = None,
) -> Path:
    """Create a case folder as mercure's router does: under ``.lock``, its files, then
    ``task.json`` (``task`` compact on one line, or ``text`` verbatim for broken files, or none).
    The one writer of case folders for every test tier."""
    folder.mkdir(parents=True)
    (folder / ".lock").touch()
    if files is not None:
        files(folder)
    if text is not None:
        (folder / "task.json").write_text(text, encoding="utf-8")
    elif task is not None:
        (folder / "task.json").write_text(json.dumps(task), encoding="utf-8")
    (folder / ".lock").unlink()
    return folder


def make_case(
    outgoing: Path,
    targets: list[str] | str,
    *,
    files: int = 3,
    rows: int = 32,
    cols: int = 32,
    case_id: str | None = None,
    **task_kwargs: Any,
) -> Path:
    """A ready case folder in ``outgoing`` (written under ``.lock``, as mercure's router does)."""
    case_id = case_id or str(uuid.uuid1())
    accession = task_kwargs.get("acc", "ACC0001")
    return write_case(
        outgoing / case_id,
        task=task_json(case_id, targets, **task_kwargs),
        files=lambda folder: make_ct_series(
            folder, files, rows=rows, cols=cols, accession=accession
        ),
    )


def nest_first_file(case: Path, subfolder: str = "series2") -> Path:
    """Move the case's first DICOM file (by name) into ``subfolder``: a case not all of whose
    files lie at its top level, for what a target does with sub-folders. Its new path."""
    moved = sorted(case.glob("*.dcm"))[0]
    (case / subfolder).mkdir()
    return moved.rename(case / subfolder / moved.name)
