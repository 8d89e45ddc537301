"""A test's dispatcher: its own outgoing/, success/ and error/ folders and the settings and
targets it saves on the session's real Prefect server (the ``env`` fixture)."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tests.cases import make_case
from tests.dicomfiles import pixel_digests, received_digests

__all__ = ["DispatchEnv"]


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

    def dispatch_unreachable(self, block: Any, name: str, *, within: float) -> dict[str, Any]:
        """Send a new case to ``block``, whose peer does not listen: the attempt must end within
        ``within`` seconds as an error, leaving the case whole and unclaimed in outgoing/.
        Returns the target's status."""
        self.save_target(block, name)
        case = make_case(self.outgoing, [name])

        started = time.monotonic()
        result = self.dispatch(case)

        assert time.monotonic() - started < within
        assert result["location"] == "outgoing"
        assert len(list(case.glob("*.dcm"))) == 3, "nothing is lost"
        assert not (case / ".processing").exists()
        status = dict(self.task(case)["dispatch"]["status"][name])
        assert status["state"] == "error"
        return status

    def dispatch_rejected(self, block: Any, name: str) -> dict[str, Any]:
        """Send a new case to ``block``, whose peer rejects the association: the case must stay
        in outgoing/, unclaimed, with one retry counted and the next far off. Returns its task."""
        self.save_settings(retry_max=5, retry_delay=600.0)
        self.save_target(block, name)
        case = make_case(self.outgoing, [name])
        result = self.dispatch(case)
        assert result["location"] == "outgoing"
        assert not (case / ".processing").exists()
        task = self.task(case)
        assert task["dispatch"]["retries"] == 1
        return task

    def dispatch_delivered(
        self, case: Path, target: str, received: Callable[[], Mapping[str, Path]], instances: int
    ) -> None:
        """Dispatch ``case`` to the DICOM ``target``: it must end in success/ with the target
        complete, ``received()`` (SOP Instance UID -> the file the peer stored) must hold every
        instance with its pixel data unchanged, and dcmsend's report (sent.txt) must count
        ``instances``, all sent successfully."""
        from blocks._dcmsend_report import parse_report

        sent = pixel_digests(case)
        result = self.dispatch(case)
        assert result["location"] == "success", result
        assert received_digests(received()) == sent
        done = self.success / case.name
        summary = parse_report((done / "sent.txt").read_text())["summary"]
        assert summary["sop_instances"] == instances
        assert summary["successful"] == instances
        assert self.task(done)["dispatch"]["status"][target]["state"] == "complete"

    def import_mercure_targets(self, targets: dict[str, Any]) -> Any:
        """Run the mercure.json importer over ``{"targets": targets}``; its report."""
        from blocks.registry import forget_cached_targets
        from deployments.importer import import_mercure_config

        path = self.outgoing.parent / "mercure.json"
        path.write_text(json.dumps({"targets": targets}))
        report = asyncio.run(import_mercure_config(path))
        forget_cached_targets()
        return report

    def import_one_target(self, name: str, spec: dict[str, Any]) -> Any:
        """Import one mercure target (every field understood) and load the block it became."""
        report = self.import_mercure_targets({name: spec})
        assert report.imported == {name: spec["target_type"]}
        assert report.ignored_fields == {}
        return self.load_target(name)

    def load_target(self, name: str) -> Any:
        from blocks.registry import aload_target

        return asyncio.run(aload_target(name))
