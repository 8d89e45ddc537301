"""The receiver's bounds without a network: refused reasons kept bounded, sizes checked."""

from __future__ import annotations

from pathlib import Path

import pytest

from blocks._receiver import REJECTED_KEPT, Receiver, check_result
from blocks.errors import PermanentTargetError
from blocks.qr import ReceiveLimits


def test_refused_objects_are_counted_and_only_the_first_reasons_kept(tmp_path: Path) -> None:
    receiver = Receiver(tmp_path, set(), None, None, ReceiveLimits(free_space_reserve_bytes=0))
    for number in range(REJECTED_KEPT * 50):
        assert receiver.accept(b"not DICOM", f"1.2.{number}")[0] is False
    result = receiver.result("C-GET", "pynetdicom", completed=0, elapsed=0.0)
    assert len(result.rejected) == REJECTED_KEPT
    assert result.rejected_count == REJECTED_KEPT * 50
    with pytest.raises(PermanentTargetError, match=f"{REJECTED_KEPT * 50} received object"):
        check_result(result, "C-GET from test")
    assert list(tmp_path.iterdir()) == []


def test_an_object_over_the_limit_is_refused_before_it_is_written(tmp_path: Path) -> None:
    receiver = Receiver(tmp_path, set(), None, None, ReceiveLimits(1000, 0))
    ok, reason = receiver.accept([b"\0" * 600, b"\0" * 600], "1.2.3")
    assert not ok
    assert reason == "1.2.3: larger than retrieve_max_instance_bytes (1000 bytes)"
    assert list(tmp_path.iterdir()) == []


def test_no_room_above_the_reserve_stops_receiving(tmp_path: Path) -> None:
    receiver = Receiver(tmp_path, set(), None, None, ReceiveLimits(free_space_reserve_bytes=2**62))
    ok, reason = receiver.accept(b"\0" * 10, "1.2.3")
    assert not ok
    assert "retrieve_free_space_reserve_bytes" in reason
    assert receiver.stopped == reason
    result = receiver.result("C-GET", "pynetdicom", completed=0, elapsed=0.0)
    with pytest.raises(PermanentTargetError, match="receiving stopped"):
        check_result(result, "C-GET from test")
