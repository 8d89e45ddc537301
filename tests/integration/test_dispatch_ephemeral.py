"""``dicom-dispatch dispatch`` without ``serve`` and without ``PREFECT_API_URL``: the command's
API is an ephemeral Prefect server, and a peer that is down is still the case's failed attempt.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from tasks.taskjson import read_task_raw
from tests.cases import make_case
from tests.peers.net import free_port
from tests.service import CLI


def ephemeral_env(home: Path) -> dict[str, str]:
    """No API configured: every command starts its own ephemeral server (SQLite, to be quick)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_API")}
    env.update(
        {
            "DICOM_DISPATCH_HOME": str(home),
            "PREFECT_HOME": str(home / "prefect"),
            "PREFECT_API_DATABASE_CONNECTION_URL": f"sqlite+aiosqlite:///{home / 'prefect.db'}",
        }
    )
    return env


@pytest.mark.timeout(600)  # an ephemeral server started per command (≈ 20 s each)
def test_refused_dicomweb_peer_is_counted_through_dispatch(tmp_path: Path) -> None:
    """A DICOMweb target whose port refuses connections: each ``dispatch`` counts an attempt
    in task.json, and at ``retry_max`` the case is in error/; every command ends in one line,
    never a traceback."""
    home = tmp_path / "home"
    folders = {name: tmp_path / name for name in ("outgoing", "success", "error")}
    for folder in folders.values():
        folder.mkdir()
    down = f"http://127.0.0.1:{free_port()}/dicom-web"  # nothing listens there
    mercure = tmp_path / "mercure.json"
    mercure.write_text(
        json.dumps(
            {
                **{f"{name}_folder": str(path) for name, path in folders.items()},
                "retry_max": 2,
                "retry_delay": 0,
                "targets": {"web_pacs": {"target_type": "dicomweb", "url": down}},
            }
        )
    )
    env = ephemeral_env(home)
    done = subprocess.run(
        [*CLI, "import-config", str(mercure)], env=env, capture_output=True, text=True, timeout=180
    )
    assert done.returncode == 0, done.stderr
    case = make_case(folders["outgoing"], ["web_pacs"])

    for attempt in (1, 2):
        done = subprocess.run(
            [*CLI, "dispatch", case.name], env=env, capture_output=True, text=True, timeout=180
        )
        assert done.returncode == 1, done.stderr
        assert "Traceback" not in done.stderr, done.stderr
        if attempt < 2:
            assert case.is_dir(), f"attempt {attempt}: the case must wait for its next attempt"
            assert read_task_raw(case)["dispatch"]["retries"] == attempt, done.stderr
            assert not (case / ".processing").exists()
    failed = folders["error"] / case.name
    assert failed.is_dir(), "retry_max reached: the case must be in error/"
    assert not case.exists()
    assert "Max retries reached" in (failed / "dispatch_error.txt").read_text()
    assert len(list(failed.glob("*.dcm"))) == 3
