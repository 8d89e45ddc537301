"""The systemd unit: rendered for a user, and valid to systemd itself where it is installed."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from deployments.service_unit import STOP_TIMEOUT_SECONDS, UnitSpec, install_unit, main, spec_for


def test_unit_names_user_group_data_dir_restart_and_stop_timeout(tmp_path: Path) -> None:
    spec = spec_for("root", data_dir=tmp_path / "data")
    unit = install_unit(spec, tmp_path / "dicom-dispatch.service").read_text()
    lines = set(unit.splitlines())
    assert {"User=root", "Group=root", "Restart=on-failure", "KillMode=mixed"} <= lines
    assert f"Environment=DICOM_DISPATCH_HOME={tmp_path / 'data'}" in lines
    assert f"TimeoutStopSec={STOP_TIMEOUT_SECONDS}" in lines
    assert STOP_TIMEOUT_SECONDS >= 120
    assert any(line.startswith("ExecStart=") and line.endswith(" serve") for line in lines)
    assert "@" not in unit.replace("@USER@", "")  # every placeholder filled
    assert (tmp_path / "data").is_dir()


@pytest.mark.parametrize("bad", ["\n", "\r", "\x00", "\x1b", "\x85"])
def test_a_control_character_in_a_value_is_refused_and_nothing_is_written(
    tmp_path: Path, bad: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """A newline in a value would add lines of its own to the unit (another ExecStart...)."""
    unit = tmp_path / "dicom-dispatch.service"
    data = tmp_path / f"data{bad}ExecStartPre=/bin/touch {tmp_path}/pwned"
    assert main(["--user", "root", "--data-dir", str(data), "--output", str(unit)]) == 1
    err = capsys.readouterr().err
    assert "control character" in err
    assert len(err.strip().splitlines()) == 1
    assert not unit.exists()
    assert list(tmp_path.iterdir()) == []
    spec = UnitSpec("root", "root", tmp_path, f"/usr/bin/dicom-dispatch{bad}")
    with pytest.raises(ValueError, match="exec"):
        install_unit(spec, unit)
    assert not unit.exists()


def test_unknown_user_is_one_line_and_exit_1(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--user", "no-such-user-here", "--output", os.devnull]) == 1
    assert "no such user" in capsys.readouterr().err


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze not installed")
def test_systemd_analyze_verifies_the_unit(tmp_path: Path) -> None:
    spec = UnitSpec("root", "root", tmp_path, f"{sys.executable} -m deployments.cli")
    unit = install_unit(spec, tmp_path / "dicom-dispatch.service")
    done = subprocess.run(
        ["systemd-analyze", "verify", "--man=no", str(unit)], capture_output=True, text=True
    )
    problems = [
        line
        for line in (done.stdout + done.stderr).splitlines()
        if "dicom-dispatch.service" in line
    ]
    assert done.returncode == 0, done.stdout + done.stderr
    assert not problems, problems


def test_cli_install_service_writes_the_unit_without_an_api(tmp_path: Path) -> None:
    """``dicom-dispatch install-service``: no Prefect server is asked (the API is unreachable)."""
    env = {**os.environ, "PREFECT_API_URL": "http://127.0.0.1:9/api"}
    unit = tmp_path / "dicom-dispatch.service"
    args = ["install-service", "--user", "root", "--output", str(unit)]
    done = subprocess.run(
        [sys.executable, "-m", "deployments.cli", *args, "--data-dir", str(tmp_path), "--json"],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert '"unit"' in done.stdout
    assert "User=root" in unit.read_text().splitlines()
