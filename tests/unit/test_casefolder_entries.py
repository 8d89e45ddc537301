"""Every entry of outgoing/ on its own (issue 17, item 1): whatever one folder holds, the scan, the
dispatcher's claims and its moves to error/ go on for every other case.

| entry | ends |
| task.json: link, FIFO, device, > 16 MiB, too deep, not UTF-8, invalid | error/, with the reason |
| .processing: link, FIFO, device, > 64 KiB | a foreign claim never released; never read |
| a folder the service cannot read or write | stays where it is, with the fix |
| a folder that vanishes or is renamed mid-scan | ignored |
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable
from pathlib import Path

import pytest

from blocks.settings import DispatcherSettings
from flows.sweep import Dispatcher
from tasks import casefolder as cf
from tasks.casefolder import HALT, PROCESSING, REASON_FILE, halt, is_halted, unhalt
from tests.peers.tmpfs import small_tmpfs

from .casefolder_helpers import GRACE, scan, task_with
from .entry_helpers import (
    as_service_user,
    device_at,
    fifo_at,
    finishes,
    give_to_service_user,
    unblock,
)
from .mercure_task import MERCURE_TASK


def stale(path: Path) -> None:
    """Make a folder and its task.json look untouched for twice the grace, links untouched."""
    old = os.lstat(path).st_mtime - 2 * GRACE
    for p in (path / "task.json", path):
        if os.path.lexists(p):
            os.utime(p, (old, old), follow_symlinks=False)


def dispatcher_for(root: Path, grace: float = GRACE) -> Dispatcher:
    return Dispatcher(
        DispatcherSettings(
            outgoing_folder=str(root / "outgoing"),
            success_folder=str(root / "success"),
            error_folder=str(root / "error"),
            invalid_grace_seconds=grace,
        )
    )


# --------------------------------------------------------------------------------------------
# task.json


def link_elsewhere(task: Path) -> str:
    elsewhere = task.parent.parent.parent / "elsewhere.json"
    elsewhere.write_text(json.dumps(MERCURE_TASK))
    task.symlink_to(elsewhere)
    return "symbolic link"


def fifo(task: Path) -> str:
    fifo_at(task)
    return "not a regular file"


def device(task: Path) -> str:
    device_at(task)
    return "not a regular file"


def huge(task: Path) -> str:
    raw = task_with()
    raw["padding"] = "x" * (16 * 2**20)  # valid JSON, a valid task: refused for its size
    task.write_text(json.dumps(raw))
    return "larger than 16 MiB"


def deep(task: Path) -> str:
    task.write_text("[" * 200_000)
    return "nested deeper than"


def not_utf8(task: Path) -> str:
    task.write_bytes(
        json.dumps(MERCURE_TASK)
        .replace("DOE^JOHN", "DOE^J\udcffN", 1)
        .encode("utf-8", "surrogateescape")
    )
    return "not UTF-8"


def invalid(task: Path) -> str:
    task.write_text(json.dumps({"id": "x"}))
    return "invalid format"


BAD_TASKS: list[Callable[[Path], str]] = [
    link_elsewhere,
    fifo,
    device,
    huge,
    deep,
    not_utf8,
    invalid,
]


@pytest.mark.parametrize("plant", BAD_TASKS, ids=lambda f: f.__name__)
def test_bad_task_json_costs_only_its_case(tmp_path: Path, make_case, plant) -> None:
    outgoing = tmp_path / "outgoing"
    good = make_case("good")
    bad = make_case("bad", task=None)
    why = plant(bad / "task.json")
    try:
        young = finishes(lambda: scan(outgoing))
        assert [c.path for c in young.ready] == [good]
        assert [(p, why in r) for p, r in young.invalid] == [(bad, True)], young.invalid

        stale(bad)
        result = finishes(lambda: scan(outgoing))
        assert [c.path for c in result.ready] == [good]
        assert [p for p, _ in result.expired_invalid] == [bad]

        # The dispatcher moves it to error/ with the reason, and only it.
        finishes(dispatcher_for(tmp_path)._scan)
    finally:
        unblock(bad / "task.json")
    moved = tmp_path / "error" / "bad"
    assert moved.is_dir()
    assert not bad.exists()
    assert why in (moved / REASON_FILE).read_text()
    assert good.is_dir()


def test_depth_is_counted_on_brackets_outside_strings(outgoing, make_case) -> None:
    raw = task_with()
    raw["process"] = {"note": "[" * 1000, "deep": json.loads("[" * 60 + "]" * 60)}
    make_case("fine", task=raw)

    assert [c.path.name for c in scan(outgoing).ready] == ["fine"]


# --------------------------------------------------------------------------------------------
# .processing


def claim_link_to_zero(marker: Path) -> None:
    marker.symlink_to("/dev/zero")


def claim_link_dangling(marker: Path) -> None:
    marker.symlink_to(marker.parent / "nowhere")


def claim_fifo(marker: Path) -> None:
    fifo_at(marker)


def claim_device(marker: Path) -> None:
    device_at(marker)


def claim_huge(marker: Path) -> None:
    marker.write_bytes(b"{" + b" " * (64 * 2**10) + b"}")


BAD_CLAIMS = [claim_link_to_zero, claim_link_dangling, claim_fifo, claim_device, claim_huge]


@pytest.mark.parametrize("plant", BAD_CLAIMS, ids=lambda f: f.__name__)
def test_odd_claim_marker_is_a_foreign_claim_never_read(
    tmp_path: Path, make_case, plant, caplog: pytest.LogCaptureFixture
) -> None:
    outgoing = tmp_path / "outgoing"
    good = make_case("good")
    bad = make_case("bad")
    marker = bad / PROCESSING
    plant(marker)
    before = os.lstat(marker)
    dispatcher = dispatcher_for(tmp_path)
    try:
        result = finishes(lambda: scan(outgoing))
        assert [c.path for c in result.ready] == [good]
        assert result.claimed == []
        assert [(p, PROCESSING in r) for p, r in result.blocked] == [(bad, True)]

        stale(bad)
        with caplog.at_level(logging.ERROR, logger="flows.sweep"):
            for _ in range(3):
                finishes(dispatcher._scan)
    finally:
        unblock(marker)
    assert os.lstat(marker) == before, "the marker is left exactly as it was"
    assert bad.is_dir(), "the case stays in outgoing/"
    said = [r for r in caplog.records if "bad" in r.getMessage()]
    assert len(said) == 1, "logged once, not every scan"


# --------------------------------------------------------------------------------------------
# folders the service cannot read or write (permission bits: run as an unprivileged user)


def test_folder_not_readable_or_writable_stays_with_the_fix(shared_root: Path, make_case) -> None:
    outgoing = shared_root / "outgoing"
    good = make_case("good", parent=outgoing)
    give_to_service_user(good)
    unreadable = make_case("unreadable", parent=outgoing)
    unreadable.chmod(0o000)
    unwritable = make_case("unwritable", parent=outgoing)  # root's 0755: readable only
    broken = make_case("broken", parent=outgoing, text="{")  # invalid, cannot be moved
    stale(broken)
    dispatcher = dispatcher_for(shared_root)

    def look() -> tuple[list[str], list[tuple[str, bool]], bool, bool]:
        result = scan(outgoing)
        dispatcher._scan()  # would move broken/ to error/: it cannot, and must not raise
        claimed = dispatcher.claim(unwritable)
        return (
            [c.path.name for c in result.ready],
            sorted((p.name, "chown" in r) for p, r in result.blocked),
            claimed,
            dispatcher.claim(good),
        )

    ready, blocked, claimed_unwritable, claimed_good = as_service_user(look)

    assert ready == ["good"]
    assert blocked == [("broken", True), ("unreadable", True), ("unwritable", True)]
    assert claimed_unwritable is False
    assert claimed_good is True
    assert [p.is_dir() for p in (broken, unreadable, unwritable)] == [True] * 3, "they stay"
    assert not (unwritable / PROCESSING).exists()


# --------------------------------------------------------------------------------------------
# folders that vanish or are renamed mid-scan


def test_folder_vanishing_or_renamed_mid_scan_is_ignored(
    outgoing: Path, make_case, monkeypatch: pytest.MonkeyPatch
) -> None:
    stays, goes, moves = make_case("stays"), make_case("goes"), make_case("moves")
    listing = os.scandir

    def listed_then_changed(path: Path) -> list[os.DirEntry[str]]:
        entries = list(listing(path))
        for name in os.listdir(goes):  # (shutil.rmtree would list with the patched scandir)
            os.unlink(goes / name)
        goes.rmdir()
        moves.rename(outgoing / "moved")
        return entries

    monkeypatch.setattr(cf.os, "scandir", listed_then_changed)
    result = scan(outgoing)
    monkeypatch.undo()

    assert [c.path for c in result.ready] == [stays]
    assert result.problems() == []
    assert result.claimed == result.busy == []
    assert sorted(c.path.name for c in scan(outgoing).ready) == ["moved", "stays"]


def test_claim_of_a_folder_gone_since_the_scan_is_no_error(tmp_path: Path, make_case) -> None:
    case = make_case("gone")
    dispatcher = dispatcher_for(tmp_path)
    case.rename(tmp_path / "elsewhere")

    assert dispatcher.claim(case) is False


# --------------------------------------------------------------------------------------------
# HALT and the cross-device move never follow a link


def test_halt_never_follows_a_link(outgoing: Path, tmp_path: Path) -> None:
    victim = tmp_path / "victim"
    (outgoing / HALT).symlink_to(victim)

    assert is_halted(outgoing), "a dangling link counts as present"
    halt(outgoing)
    assert not victim.exists(), "HALT was created through the link"
    assert is_halted(outgoing)
    unhalt(outgoing)
    assert not os.path.lexists(outgoing / HALT)
    assert not is_halted(outgoing)


def test_cross_device_move_is_whole_or_nothing_and_keeps_links(tmp_path: Path, make_case) -> None:
    case = make_case("moving")
    (case / "sub").mkdir()
    (case / "sub" / "a.dcm").write_bytes(b"A" * 5000)
    secret = tmp_path / "secret"
    secret.write_text("not for the case")
    (case / "link").symlink_to(secret)
    fifo_at(case / "pipe")
    with small_tmpfs(tmp_path / "other-disk", "8m") as disk:
        dest = finishes(lambda: cf.move_case(case, disk / "error", reason="test"))

        assert dest == disk / "error" / "moving"
        assert not case.exists()
        assert sorted(p.name for p in (disk / "error").iterdir()) == ["moving"]
        assert (dest / "sub" / "a.dcm").read_bytes() == b"A" * 5000
        assert (dest / "link").is_symlink()
        assert os.readlink(dest / "link") == str(secret)
        assert not (dest / "pipe").exists(), "a FIFO holds nothing to move"
        assert json.loads((dest / "task.json").read_text())["id"] == MERCURE_TASK["id"]
