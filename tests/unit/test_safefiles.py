"""tasks/safefiles.py and its users: no file of ours is written through a planted link, and the
links a case may hold; the background executor's allow-list check (flows/background/checks.py)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tasks import casefolder as cf
from tasks.safefiles import (
    LINK_REFUSED,
    case_links_problem,
    create_new,
    ensure_marker,
    replace_file,
)
from tasks.taskjson import TaskFileError, read_task, update_task

SECRET = b"the victim's bytes\n"


@pytest.fixture
def victim(tmp_path: Path) -> Path:
    path = tmp_path / "victim"
    path.write_bytes(SECRET)
    return path


def test_replace_file_replaces_a_planted_link_not_its_target(tmp_path: Path, victim: Path) -> None:
    (tmp_path / "report.txt").symlink_to(victim)
    replace_file(tmp_path / "report.txt", b"ours")
    assert victim.read_bytes() == SECRET
    assert not (tmp_path / "report.txt").is_symlink()
    assert (tmp_path / "report.txt").read_bytes() == b"ours"
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")] == []


def test_create_new_and_markers_never_follow_a_link(tmp_path: Path, victim: Path) -> None:
    (tmp_path / ".complete").symlink_to(victim)
    (tmp_path / "dangling").symlink_to(tmp_path / "nowhere")
    with pytest.raises(FileExistsError):
        create_new(tmp_path / ".complete", b"x")
    with pytest.raises(FileExistsError):
        create_new(tmp_path / "dangling", b"x")
    with pytest.raises(OSError, match="not a regular file"):
        ensure_marker(tmp_path / ".complete")
    assert victim.read_bytes() == SECRET
    assert not (tmp_path / "nowhere").exists()
    ensure_marker(tmp_path / ".lock")
    ensure_marker(tmp_path / ".lock")  # an existing marker is fine
    assert (tmp_path / ".lock").read_bytes() == b""


def test_task_json_is_read_only_as_a_regular_file(make_case, victim: Path) -> None:
    case = make_case()
    real = case / "task.json"
    target = case.parent / "elsewhere.json"
    real.rename(target)
    real.symlink_to(target)
    with pytest.raises(TaskFileError, match="symbolic link"):
        read_task(case)
    with pytest.raises(TaskFileError, match="symbolic link"):
        update_task(case, lambda raw: raw.update(changed=True))
    assert b"changed" not in target.read_bytes()


def test_claims_and_reasons_leave_planted_links_alone(make_case, tmp_path: Path, victim: Path):
    case = make_case()
    (case / cf.PROCESSING).symlink_to(victim)
    assert cf.claim_case(case) is False, "a planted marker is someone else's claim"
    (case / cf.PROCESSING).unlink()

    assert cf.claim_case(case) is True
    (case / f"{cf.PROCESSING}.{os.getpid()}.tmp").symlink_to(victim)  # the old temp name
    cf.record_claim_run(case, "run-1")
    assert cf.read_claim(case) is not None
    assert cf.read_claim(case).flow_run_id == "run-1"  # type: ignore[union-attr]

    (case / cf.REASON_FILE).symlink_to(victim)
    error = tmp_path / "error"
    moved = cf.move_case(case, error, fail_stage=cf.FAIL_STAGE, reason="planted links")
    assert victim.read_bytes() == SECRET
    assert (moved / cf.REASON_FILE).read_text() == "planted links\n"
    assert not (moved / cf.REASON_FILE).is_symlink()


def test_which_links_a_case_may_hold(tmp_path: Path, victim: Path) -> None:
    case = tmp_path / "case"
    (case / "sub").mkdir(parents=True)
    (case / "a.dcm").write_bytes(b"a")
    assert case_links_problem(case) is None

    (case / "sub" / "b.dcm").symlink_to("../a.dcm")
    inside = case_links_problem(case)
    assert inside is not None
    assert inside.startswith(LINK_REFUSED)
    assert "sub/b.dcm -> ../a.dcm" in inside
    assert case_links_problem(case, allow_inside=True) is None

    (case / "c.dcm").symlink_to(victim)
    outside = case_links_problem(case, allow_inside=True)
    assert outside is not None
    assert "leads outside the case folder" in outside
    (case / "c.dcm").unlink()

    (case / "up").symlink_to("..")
    assert case_links_problem(case, allow_inside=True) is not None
    (case / "up").unlink()
    (case / "gone.dcm").symlink_to(case / "missing")
    assert case_links_problem(case, allow_inside=True) is not None
    (case / "gone.dcm").unlink()

    os.mkfifo(case / "pipe.dcm")
    fifo = case_links_problem(case, allow_inside=True)
    assert fifo is not None
    assert "not a regular file" in fifo


def test_received_objects_replace_a_planted_link(tmp_path: Path, victim: Path) -> None:
    from pydicom import dcmread

    from blocks._receiver import Receiver
    from tests.dicomfiles import make_ct_series

    source = tmp_path / "source"
    source.mkdir()
    make_ct_series(source, 1)
    [path] = list(source.glob("*.dcm"))
    uid = str(dcmread(path).SOPInstanceUID)
    folder = tmp_path / "received"
    folder.mkdir()
    (folder / f"{uid}.dcm").symlink_to(victim)

    ok, reason = Receiver(folder, set(), None, None).accept(path.read_bytes(), uid)

    assert ok, reason
    assert victim.read_bytes() == SECRET
    assert not (folder / f"{uid}.dcm").is_symlink()
    assert (folder / f"{uid}.dcm").read_bytes() == path.read_bytes()
