"""deployments/limits.py: every tag limit the service manages, from the settings and targets."""

from __future__ import annotations

from blocks.registry import TARGET_TYPES
from blocks.settings import DispatcherSettings
from deployments.limits import wanted_limits


def test_every_managed_tag_gets_its_limit_and_unset_means_none() -> None:
    settings = DispatcherSettings(num_proc=8, type_limits={"dicom": 4, "sftp": 0})
    wanted = wanted_limits(settings, {"PACS_Main": 2, "archive": None, "share": 0})

    assert wanted["dicom-dispatch"] == 8
    assert wanted["target-type:dicom"] == 4
    assert wanted["target-type:sftp"] == 0
    assert {f"target-type:{kind}" for kind in TARGET_TYPES} <= set(wanted), "every type managed"
    assert wanted["target-type:folder"] == 0, "a type without a limit: none (deleted)"
    assert wanted["target:PACS_Main"] == 2
    assert wanted["target:archive"] == 0
    assert wanted["target:share"] == 0
    expected = 1 + len(TARGET_TYPES) + 3
    assert len(wanted) == expected, "nothing else is touched"
