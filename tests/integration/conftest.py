"""Per-test dispatcher folders and settings on the session's real Prefect server."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest


@dataclass
class DispatchEnv:
    outgoing: Path
    success: Path
    error: Path

    def save_settings(self, **changes: Any) -> None:
        from blocks.settings import DispatcherSettings

        fields: dict[str, Any] = {
            "outgoing_folder": str(self.outgoing),
            "success_folder": str(self.success),
            "error_folder": str(self.error),
            "retry_max": 3,
            "retry_delay": 0.0,
            "dispatcher_scan_interval": 0.2,
            "invalid_grace_seconds": 3600,
            "quick_retry_delays": [0.2, 0.2],
        }
        fields.update(changes)
        DispatcherSettings(**fields).save("default", overwrite=True)

    def save_target(self, block: Any, name: str) -> None:
        from blocks.base import target_slug
        from blocks.registry import aremove_other_types, forget_cached_targets

        block.target_name = name
        asyncio.run(aremove_other_types(target_slug(name), type(block)))
        block.save(target_slug(name), overwrite=True)
        forget_cached_targets()

    def task(self, case: Path) -> dict[str, Any]:
        return dict(json.loads((case / "task.json").read_text()))

    def dispatch(self, case: Path | str) -> dict[str, Any]:
        from flows.dispatch import run_dispatch

        return dict(asyncio.run(run_dispatch(str(case))))


@pytest.fixture
def env(prefect_server: str, tmp_path: Path) -> Iterator[DispatchEnv]:
    e = DispatchEnv(tmp_path / "outgoing", tmp_path / "success", tmp_path / "error")
    for folder in (e.outgoing, e.success, e.error):
        folder.mkdir()
    e.save_settings()
    return e
