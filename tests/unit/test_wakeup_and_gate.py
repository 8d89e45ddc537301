"""Which file-system events wake the dispatcher loop, and the per-node association gate."""

from __future__ import annotations

import threading
import time
from pathlib import Path

from watchfiles import Change

from blocks._peer_gate import peer_gate
from flows._wakeup import is_wakeup_event


def test_events_that_can_make_a_case_ready_wake_the_loop(tmp_path: Path) -> None:
    out = tmp_path
    case = out / "case1"
    case.mkdir()

    def wakes(change: Change, path: Path) -> bool:
        return is_wakeup_event(out, change, str(path))

    assert wakes(Change.added, case)  # a case folder created or moved in
    assert not wakes(Change.deleted, case)  # moved to success/: nothing became ready
    assert wakes(Change.deleted, case / ".lock")
    assert wakes(Change.deleted, case / ".error")
    assert wakes(Change.deleted, case / ".processing")  # a claim released
    assert not wakes(Change.added, case / ".lock")
    assert wakes(Change.added, case / "task.json")  # moved into place
    assert wakes(Change.modified, case / "task.json")
    assert wakes(Change.deleted, out / "HALT")
    assert not wakes(Change.added, out / "HALT")
    assert not wakes(Change.added, case / "image1.dcm")  # copying a case costs no scans
    (case / ".processing").touch()
    assert not wakes(Change.modified, case / "task.json")  # our own status writes


def test_peer_gate_lets_one_association_in_at_a_time() -> None:
    inside = 0
    most = 0
    lock = threading.Lock()

    def send(size: int) -> None:
        nonlocal inside, most
        with peer_gate("127.0.0.1", 11112, "PACS", size):
            with lock:
                inside += 1
                most = max(most, inside)
            time.sleep(0.05)
            with lock:
                inside -= 1

    for size, expected in ((1, 1), (3, 3)):
        most = 0
        threads = [threading.Thread(target=send, args=(size,)) for _ in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert most == expected
