"""blocks/host.py: the tests' shorter claim heartbeat and takeover window, and where they apply.

Set only by the test suite (``DICOM_DISPATCH_TEST_*``); the settings block keeps its documented
45–150 s range, and the zombie-run automation never gets a window under 35 s.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from pydantic import ValidationError

from blocks.host import (
    TEST_CLAIM_HEARTBEAT_ENV,
    TEST_TAKEOVER_WINDOW_ENV,
    claim_heartbeat_seconds,
    takeover_window_seconds,
    zombie_window_seconds,
)
from blocks.settings import DispatcherSettings
from flows.takeover import ForeignClaims
from tasks.claims import CLAIM_HEARTBEAT_SECONDS

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True)
def _unset(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(TEST_CLAIM_HEARTBEAT_ENV, raising=False)
    monkeypatch.delenv(TEST_TAKEOVER_WINDOW_ENV, raising=False)


def test_without_the_variables_the_configured_values_hold() -> None:
    assert claim_heartbeat_seconds(CLAIM_HEARTBEAT_SECONDS) == CLAIM_HEARTBEAT_SECONDS
    assert takeover_window_seconds(90) == 90
    assert zombie_window_seconds(90) == 90
    assert ForeignClaims().interval == CLAIM_HEARTBEAT_SECONDS


def test_the_tests_may_shorten_heartbeat_and_window(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(TEST_CLAIM_HEARTBEAT_ENV, "0.5")
    monkeypatch.setenv(TEST_TAKEOVER_WINDOW_ENV, "6")
    assert claim_heartbeat_seconds(CLAIM_HEARTBEAT_SECONDS) == 0.5
    assert takeover_window_seconds(90) == 6
    assert ForeignClaims().interval == 0.5, "foreign claims are judged as often as refreshed"
    assert ForeignClaims(interval=3).interval == 3


def test_the_zombie_window_stays_above_prefects_heartbeat(monkeypatch: pytest.MonkeyPatch) -> None:
    """Prefect sends flow-run heartbeats every 30 s: a shorter window would crash live runs."""
    monkeypatch.setenv(TEST_TAKEOVER_WINDOW_ENV, "6")
    assert zombie_window_seconds(90) == 35
    monkeypatch.setenv(TEST_TAKEOVER_WINDOW_ENV, "50")
    assert zombie_window_seconds(90) == 50


@pytest.mark.parametrize("text", ["0", "-3", "soon", "nan"])
def test_a_value_that_is_no_positive_number_is_ignored(
    monkeypatch: pytest.MonkeyPatch, text: str
) -> None:
    monkeypatch.setenv(TEST_CLAIM_HEARTBEAT_ENV, text)
    monkeypatch.setenv(TEST_TAKEOVER_WINDOW_ENV, text)
    assert claim_heartbeat_seconds(15.0) == 15.0
    assert takeover_window_seconds(90) == 90


def test_the_settings_block_keeps_its_documented_range() -> None:
    """The shortening is not a block field: a site cannot set a window under 45 s."""
    assert "takeover" not in " ".join(
        name for name in DispatcherSettings.model_fields if name != "takeover_window_seconds"
    )
    for bad in (44, 151):
        with pytest.raises(ValidationError):
            DispatcherSettings(takeover_window_seconds=bad)


def test_the_claim_heartbeat_thread_uses_the_shorter_interval(tmp_path: Path) -> None:
    """In a fresh process (the heartbeat thread is one per process): a held claim is refreshed
    within a second when the tests ask for a 0.2 s heartbeat."""
    code = textwrap.dedent(
        """
        import sys, time
        from pathlib import Path
        from tasks.claims import claim_case, read_claim
        case = Path(sys.argv[1])
        case.mkdir()
        assert claim_case(case, "run-1")
        first = read_claim(case).heartbeat
        deadline = time.monotonic() + 5
        while read_claim(case).heartbeat == first:
            assert time.monotonic() < deadline, "the claim was not refreshed"
            time.sleep(0.05)
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path / "case")],
        cwd=ROOT,
        env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT), TEST_CLAIM_HEARTBEAT_ENV: "0.2"},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr[-2000:]
