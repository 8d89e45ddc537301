"""A process of the service ends at once whatever Prefect still has queued for an API that is
gone: Prefect's own exit drain has no time limit (``prefect/_internal/concurrency/services.py``)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

from tests.peers.net import free_port

SCRIPT = """
import sys, time
from prefect.events import emit_event
from deployments.service.stop_budget import leave_process

for i in range(20):
    emit_event(event="dicom-dispatch.test", resource={"prefect.resource.id": f"case.{i}"})
print("queued", flush=True)
leave_process(3, time.monotonic() + 1.0)
"""


def test_queued_events_for_a_dead_api_do_not_hold_the_exit(tmp_path: Path) -> None:
    """Events queued for an API nobody answers (a plain exit waits ≈ 10 s for them here):
    gone within 3 s, the exit code kept."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_API")}
    env["PREFECT_API_URL"] = f"http://127.0.0.1:{free_port()}/api"  # nothing listens
    env["PREFECT_HOME"] = str(tmp_path / "prefect")
    with subprocess.Popen(
        [sys.executable, "-c", SCRIPT],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    ) as proc:
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == "queued"
        queued = time.monotonic()
        code = proc.wait(60)
        took = time.monotonic() - queued
    assert code == 3
    assert took < 3.0, f"the process took {took:.1f} s to end"
