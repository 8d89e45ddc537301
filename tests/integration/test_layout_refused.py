"""error/ inside success/ (the cleaner would empty it) is refused by ``import-config`` and
``serve`` with one line and an exit code, and nothing changes."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.integration.conftest import DispatchEnv

pytestmark = pytest.mark.integration

CLI = [sys.executable, "-m", "deployments.cli"]


def run_cli(*args: str, home: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "DICOM_DISPATCH_HOME": str(home)}
    return subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=120, env=env)


def our_lines(stderr: str) -> list[str]:
    """The command's own error lines (Prefect's workers may log beside them)."""
    return [line for line in stderr.splitlines() if line.startswith("dicom-dispatch:")]


def current_settings() -> dict[str, object]:
    from blocks.registry import aload_settings

    return dict(asyncio.run(aload_settings()).model_dump(mode="json"))


def test_import_config_refuses_error_inside_success(env: DispatchEnv, tmp_path: Path) -> None:
    before = current_settings()
    config = tmp_path / "mercure.json"
    config.write_text(
        json.dumps(
            {
                "outgoing_folder": str(env.outgoing),
                "success_folder": str(env.success),
                "error_folder": str(env.success / "error"),
                "targets": {"layout_probe": {"target_type": "dummy"}},
            }
        )
    )
    done = run_cli("import-config", str(config), home=tmp_path / "home")
    assert done.returncode != 0
    (line,) = our_lines(done.stderr)
    assert "error_folder" in line
    assert "inside success_folder" in line
    assert current_settings() == before, "the settings changed"
    listed = run_cli("targets", "list", "--json", home=tmp_path / "home")
    assert "layout_probe" not in listed.stdout, "a target was imported"


def test_serve_refuses_error_inside_success(env: DispatchEnv, tmp_path: Path) -> None:
    env.save_settings(error_folder=str(env.success / "error"))
    try:
        done = run_cli("serve", home=tmp_path / "home")
    finally:
        env.save_settings()
    assert done.returncode != 0
    (line,) = our_lines(done.stderr)
    assert "error_folder" in line, done.stderr[-2000:]
    assert "inside success_folder" in line
    assert "Traceback" not in done.stderr
    assert not (env.success / "error").exists(), "serve created the nested folder"
