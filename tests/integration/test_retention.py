"""The service's cleaner on real volumes: an emergency clean on a small tmpfs, the periodic task.

The emergency test mounts a tmpfs of a few MiB (needs root and mount rights; skipped with the
reason otherwise) holding outgoing/, success/ and error/, filled past the threshold.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from blocks.settings import DispatcherSettings
from deployments.service.cleaner_service import clean_once, run_cleaner
from tests.dispatch_env import DispatchEnv
from tests.peers.tmpfs import small_tmpfs

CASE_BYTES = 300 * 1024


def make_sent(root: Path, name: str, age: float) -> Path:
    case = root / name
    case.mkdir(parents=True)
    (case / "task.json").write_text(json.dumps({"id": name}))
    (case / "1.dcm").write_bytes(os.urandom(CASE_BYTES))
    stamp = time.time() - age
    os.utime(case, (stamp, stamp))
    return case


def window_away_from(now: dt.datetime) -> tuple[str, str]:
    """An off-peak window that does not contain ``now``."""
    start, end = now + dt.timedelta(hours=2), now + dt.timedelta(hours=3)
    return start.strftime("%H:%M"), end.strftime("%H:%M")


def settings_for(base: Path, **changes: object) -> DispatcherSettings:
    fields: dict[str, object] = {
        "outgoing_folder": str(base / "outgoing"),
        "success_folder": str(base / "success"),
        "error_folder": str(base / "error"),
        "cleaner_enabled": True,
    }
    fields.update(changes)
    return DispatcherSettings(**fields)


def snapshot(folder: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()
    }


@pytest.fixture
def small_volume(tmp_path: Path) -> Iterator[Path]:
    with small_tmpfs(tmp_path / "volume") as mountpoint:
        yield mountpoint


def used_fraction(path: Path) -> float:
    usage = shutil.disk_usage(path)
    return usage.used / usage.total


def test_emergency_clean_on_a_full_volume_removes_oldest_sent_cases_only(
    small_volume: Path,
) -> None:
    success, error, outgoing = (small_volume / n for n in ("success", "error", "outgoing"))
    ages = {f"sent-{i}": 1000.0 * (9 - i) for i in range(8)}  # sent-0 oldest
    for name, age in ages.items():
        make_sent(success, name, age)
    for name in ("failed-0", "failed-1"):
        make_sent(error, name, 1e6)  # older than anything: still never touched
    for name in ("queued-0", "queued-1"):
        make_sent(outgoing, name, 1e6)
    kept_error, kept_outgoing = snapshot(error), snapshot(outgoing)
    before = used_fraction(small_volume)
    threshold = 70.0
    assert before * 100 > threshold, f"the volume is only {before:.0%} full"

    now = dt.datetime.now()
    start, end = window_away_from(now)  # the regular clean must not be what removes them
    settings = settings_for(
        small_volume,
        retention=0,
        emergency_clean_percentage=threshold,
        offpeak_start=start,
        offpeak_end=end,
    )
    report = clean_once(settings)

    assert report.emergency
    after = used_fraction(small_volume)
    assert after * 100 <= threshold
    remaining = sorted(p.name for p in success.iterdir())
    removed = sorted(set(ages) - set(remaining))
    assert removed == sorted(report.removed)
    # The oldest went, and no more than needed: keeping the youngest removed case would not do.
    assert removed == [f"sent-{i}" for i in range(len(removed))]
    assert after * 100 + CASE_BYTES / shutil.disk_usage(small_volume).total * 100 > threshold
    assert snapshot(error) == kept_error
    assert snapshot(outgoing) == kept_outgoing


def test_the_service_task_cleans_old_cases_off_peak_only_when_switched_on(
    tmp_path: Path,
) -> None:
    success = tmp_path / "success"
    make_sent(success, "old", 7200)
    make_sent(success, "young", 60)
    make_sent(tmp_path / "error", "old-error", 7200)
    state = {"settings": settings_for(tmp_path, cleaner_enabled=False, retention=3600)}
    state["settings"].cleaner_scan_interval = 0.05
    state["settings"].offpeak_start = state["settings"].offpeak_end = "00:00"  # always off-peak

    async def run_for(seconds: float) -> None:
        stop = asyncio.Event()
        task = asyncio.create_task(run_cleaner(lambda: state["settings"], stop))
        await asyncio.sleep(seconds)
        stop.set()
        await asyncio.wait_for(task, 5)

    assert not DispatcherSettings().cleaner_enabled  # off by default
    asyncio.run(run_for(0.4))
    assert {p.name for p in success.iterdir()} == {"old", "young"}

    state["settings"] = state["settings"].model_copy(update={"cleaner_enabled": True})
    asyncio.run(run_for(0.4))
    assert {p.name for p in success.iterdir()} == {"young"}
    assert (tmp_path / "error" / "old-error").is_dir()


def test_import_config_takes_mercures_retention_and_says_cleaning_is_off(
    env: DispatchEnv, tmp_path: Path
) -> None:
    from blocks.registry import aload_settings
    from deployments.importer import import_mercure_config

    path = tmp_path / "mercure.json"
    mercure = {
        "success_folder": str(env.success),
        "retention": 86400,
        "emergency_clean_percentage": 80,
        "cleaner_scan_interval": 120,
        "targets": {},
    }
    path.write_text(json.dumps(mercure))

    report = asyncio.run(import_mercure_config(path)).as_dict()

    assert report["cleaning"]["enabled"] is False
    assert report["cleaning"]["summary"].startswith("off:")
    saved = asyncio.run(aload_settings())
    assert (saved.retention, saved.emergency_clean_percentage) == (86400, 80)
    assert saved.cleaner_scan_interval == 120
    assert not saved.cleaner_enabled

    saved.cleaner_enabled = True  # a site switches it on; a later import keeps it and says so
    saved.save("default", overwrite=True)
    again = asyncio.run(import_mercure_config(path)).as_dict()
    assert again["cleaning"]["enabled"] is True
    assert "86400 s" in again["cleaning"]["summary"]
