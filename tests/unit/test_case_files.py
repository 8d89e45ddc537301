"""How senders read a case at send time (tasks/safefiles.py): never through a link, never
blocking on a FIFO, and snapshots for programs that open files by name."""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path

import pytest

from tasks.safefiles import CaseFiles, descriptor_path, open_case_file, private_snapshot

SECRET = b"the victim's bytes\n"


@pytest.fixture
def case(tmp_path: Path) -> Path:
    folder = tmp_path / "case"
    (folder / "series").mkdir(parents=True)
    (folder / "a.dcm").write_bytes(b"A" * 10)
    (folder / "series" / "b.dcm").write_bytes(b"B" * 20)
    (tmp_path / "victim").write_bytes(SECRET)
    (tmp_path / "victims").mkdir()
    (tmp_path / "victims" / "b.dcm").write_bytes(SECRET)
    return folder


def test_a_regular_file_opens_by_relative_or_absolute_name(case: Path) -> None:
    with open_case_file(case, Path("series/b.dcm")) as fh:
        assert fh.read() == b"B" * 20
    with CaseFiles(case).open(case / "a.dcm") as fh:
        assert fh.read() == b"A" * 10
        assert Path(descriptor_path(fh)).read_bytes() == b"A" * 10


def test_a_link_is_never_followed_at_any_depth(case: Path) -> None:
    (case / "a.dcm").unlink()
    (case / "a.dcm").symlink_to(case.parent / "victim")
    with pytest.raises(OSError, match="a.dcm is a symbolic link") as caught:
        open_case_file(case, Path("a.dcm"))
    assert caught.value.errno == errno.ELOOP
    (case / "series").rename(case / "moved")
    (case / "series").symlink_to(case.parent / "victims")
    with pytest.raises(OSError, match="reached through series, which is a symbolic link"):
        open_case_file(case, Path("series/b.dcm"))


def test_links_inside_are_read_as_the_file_they_name_and_outside_refused(case: Path) -> None:
    files = CaseFiles(case, links_inside=True)
    (case / "rel.dcm").symlink_to("series/b.dcm")
    (case / "abs.dcm").symlink_to(case / "a.dcm")
    (case / "series" / "up.dcm").symlink_to("../a.dcm")
    (case / "alias").symlink_to("series")
    for name, data in [
        ("rel.dcm", b"B" * 20),
        ("abs.dcm", b"A" * 10),
        ("series/up.dcm", b"A" * 10),
        ("alias/b.dcm", b"B" * 20),
    ]:
        with files.open(Path(name)) as fh:
            assert fh.read() == data, name
    (case / "out.dcm").symlink_to("../victim")
    (case / "far.dcm").symlink_to(case.parent / "victim")
    (case / "loop.dcm").symlink_to("loop.dcm")
    for name in ("out.dcm", "far.dcm"):
        with pytest.raises(OSError, match="leads outside the case folder"):
            files.open(Path(name))
    with pytest.raises(OSError, match="symbolic link"):
        files.open(Path("loop.dcm"))


def test_a_fifo_swapped_in_is_refused_at_once(case: Path) -> None:
    (case / "a.dcm").unlink()
    os.mkfifo(case / "a.dcm")
    with pytest.raises(OSError, match="not a regular file") as caught:
        open_case_file(case, Path("a.dcm"))  # would block forever without O_NONBLOCK
    assert caught.value.errno == errno.EINVAL


def test_a_snapshot_is_private_and_holds_the_opened_files(case: Path) -> None:
    os.utime(case / "a.dcm", (1_000_000, 1_000_000))
    names = [Path("a.dcm"), Path("series/b.dcm")]
    with private_snapshot(CaseFiles(case), names) as folder:
        assert case not in folder.parents
        assert folder != case
        assert stat.S_IMODE(folder.stat().st_mode) == 0o700
        for rel in names:
            there = folder / rel
            assert not there.is_symlink()
            assert there.read_bytes() == (case / rel).read_bytes()
        assert (folder / "a.dcm").stat().st_mtime == 1_000_000
    assert not folder.exists()


def test_a_snapshot_never_holds_a_links_target(case: Path) -> None:
    (case / "a.dcm").unlink()
    (case / "a.dcm").symlink_to(case.parent / "victim")
    with (
        pytest.raises(OSError, match="symbolic link"),
        private_snapshot(CaseFiles(case), [Path("a.dcm")]),
    ):
        pass
    with private_snapshot(CaseFiles(case, links_inside=True), []) as folder:
        assert list(folder.iterdir()) == []
    (case / "in.dcm").symlink_to("series/b.dcm")
    with private_snapshot(CaseFiles(case, links_inside=True), [Path("in.dcm")]) as folder:
        assert not (folder / "in.dcm").is_symlink()
        assert (folder / "in.dcm").read_bytes() == b"B" * 20


def test_a_snapshot_copies_where_hard_links_are_impossible(
    case: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def cross_device(*_: object, **__: object) -> None:
        raise OSError(errno.EXDEV, "Invalid cross-device link")

    monkeypatch.setattr(os, "link", cross_device)
    os.utime(case / "a.dcm", (1_000_000, 1_000_000))
    with private_snapshot(CaseFiles(case), [Path("a.dcm")]) as folder:
        copy = (folder / "a.dcm").stat()
        assert copy.st_ino != (case / "a.dcm").stat().st_ino
        assert (folder / "a.dcm").read_bytes() == b"A" * 10
        assert copy.st_mtime == 1_000_000
