"""Folders that cannot hurt each other: outgoing, success and error distinct and never nested
(links resolved), and a cleaner that never removes anything but a case directly in success/."""

from __future__ import annotations

import datetime as dt
import json
import os
from pathlib import Path

import pytest

from blocks.errors import ConfigError
from blocks.settings import DispatcherSettings, check_folder_layout
from deployments.service.cleaner_service import clean_once

OLD = dt.datetime(2026, 1, 1, 3, 0)  # off-peak


def folders(root: Path, outgoing: str, success: str, error: str) -> tuple[Path, Path, Path]:
    return root / outgoing, root / success, root / error


def test_three_distinct_sibling_folders_are_fine(tmp_path: Path) -> None:
    check_folder_layout(*folders(tmp_path, "outgoing", "success", "error"))
    check_folder_layout(*folders(tmp_path, "q/outgoing", "success", "success-errors"))


@pytest.mark.parametrize(
    ("layout", "match"),
    [
        (("outgoing", "success", "success/error"), "error_folder .* is inside success_folder"),
        (("outgoing", "success", "success"), "are the same folder"),
        (("error/outgoing", "success", "error"), "outgoing_folder .* is inside error_folder"),
        (("outgoing", "outgoing/success", "error"), "success_folder .* is inside outgoing_folder"),
        (("outgoing", "success/..", "error"), "inside success_folder"),
    ],
)
def test_nested_or_shared_folders_are_refused(
    tmp_path: Path, layout: tuple[str, str, str], match: str
) -> None:
    with pytest.raises(ConfigError, match=match) as refused:
        check_folder_layout(*folders(tmp_path, *layout))
    assert "\n" not in str(refused.value)


def test_links_are_resolved(tmp_path: Path) -> None:
    (tmp_path / "success" / "failed").mkdir(parents=True)
    (tmp_path / "error").symlink_to(tmp_path / "success" / "failed")
    with pytest.raises(ConfigError, match="inside success_folder"):
        check_folder_layout(*folders(tmp_path, "outgoing", "success", "error"))
    settings = DispatcherSettings(
        outgoing_folder=str(tmp_path / "outgoing"),
        success_folder=str(tmp_path / "success"),
        error_folder=str(tmp_path / "error"),
    )
    with pytest.raises(ConfigError):
        settings.checked_folders()


def case(folder: Path, name: str) -> Path:
    path = folder / name
    path.mkdir(parents=True)
    (path / "task.json").write_text(json.dumps({"id": name}))
    (path / "a.dcm").write_bytes(b"\0" * 4096)
    old = OLD.timestamp() - 30 * 86400
    os.utime(path, (old, old))
    return path


def test_the_cleaner_removes_nothing_but_cases_directly_in_success(tmp_path: Path) -> None:
    """error/ inside success/ (refused at import and start, but a block can be edited) and
    outgoing/ reached through a link in success/: the cleaner, emergency clean included,
    removes only the sent case."""
    success = tmp_path / "success"
    error = success / "error"
    outgoing = tmp_path / "outgoing"
    sent = case(success, "sent")
    failed = case(error, "failed")
    queued = case(outgoing, "queued")
    os.utime(error, (OLD.timestamp() - 60 * 86400,) * 2)
    (success / "queue-link").symlink_to(outgoing)
    settings = DispatcherSettings(
        outgoing_folder=str(outgoing),
        success_folder=str(success),
        error_folder=str(error),
        retention=86400,
        emergency_clean_percentage=0.001,  # every case is due at once
    )

    report = clean_once(settings, OLD)

    assert not sent.exists()
    assert report.removed == ["sent"]
    assert (failed / "a.dcm").is_file(), "error/ was removed by the cleaner"
    assert (queued / "a.dcm").is_file()
    assert (success / "queue-link").is_symlink()
