"""Shared fixtures for the unit tests: mercure case folders on a tmp_path."""

from __future__ import annotations

import copy
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.cases import write_case

from .entry_helpers import shared_root
from .mercure_task import CASE_ID, MERCURE_TASK, SERIES_UID

#: ``shared_root`` is a fixture: imported here, every unit test that names it gets it.
__all__ = ["shared_root"]

_EXAMPLE = object()


@pytest.fixture
def task_dict() -> dict[str, Any]:
    """A fresh, mutable copy of mercure's example task."""
    return copy.deepcopy(MERCURE_TASK)


@pytest.fixture
def outgoing(tmp_path: Path) -> Path:
    path = tmp_path / "outgoing"
    path.mkdir()
    return path


MakeCase = Callable[..., Path]


def _two_files(case: Path) -> None:
    """A stand-in DICOM file (preamble and magic only) and its tags file, as mercure names them."""
    (case / f"{SERIES_UID}#1.2.3.4.1.dcm").write_bytes(b"\0" * 128 + b"DICM" + b"\1" * 64)
    (case / f"{SERIES_UID}#1.2.3.4.1.tags").write_text(
        json.dumps({"SeriesInstanceUID": SERIES_UID}), encoding="utf-8"
    )


@pytest.fixture
def make_case(outgoing: Path) -> MakeCase:
    """Write a case folder: ``task.json`` (compact, one line, as mercure writes it) and two files.

    ``task`` is a dict to write (default: mercure's example), or ``None`` for no task.json;
    ``text`` writes task.json verbatim instead (for broken files).
    """

    def make(
        name: str = CASE_ID,
        task: Any = _EXAMPLE,
        *,
        parent: Path | None = None,
        text: str | None = None,
        files: bool = True,
    ) -> Path:
        data = copy.deepcopy(MERCURE_TASK) if task is _EXAMPLE else task
        return write_case(
            (parent or outgoing) / name,
            task=data,
            text=text,
            files=_two_files if files else None,
        )

    return make


@pytest.fixture(scope="session")
def prefect_server() -> str:
    """The unit tier runs without a Prefect server: a test that needs one (or ``env``, which
    saves blocks on it) belongs in tests/integration."""
    pytest.fail("unit tests run without a Prefect server; move this test to tests/integration")
