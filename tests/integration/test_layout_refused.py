"""error/ inside success/ (the cleaner would empty it) is refused by ``import-config`` and
``serve`` with one line and an exit code, and nothing changes."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

from tests.dispatch_env import DispatchEnv
from tests.service import run_cli, serve_env


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
    done = run_cli("import-config", str(config), env=serve_env(tmp_path / "home"))
    assert done.returncode != 0
    (line,) = our_lines(done.stderr)
    assert "error_folder" in line
    assert "inside success_folder" in line
    assert current_settings() == before, "the settings changed"
    listed = run_cli("targets", "list", "--json", env=serve_env(tmp_path / "home"))
    assert "layout_probe" not in listed.stdout, "a target was imported"
