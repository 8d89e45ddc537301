"""dispatch_case against Folder and Dummy targets: the folder protocol end to end."""

from __future__ import annotations

from pathlib import Path

from blocks.dummy import DummyTarget
from blocks.folder import FolderTarget
from tests.cases import make_case
from tests.dispatch_env import DispatchEnv


def _received(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if not p.name.startswith("."))


def test_folder_target_receives_case_with_complete_marker(env: DispatchEnv, tmp_path: Path) -> None:
    dest = tmp_path / "share"
    env.save_target(FolderTarget(folder=str(dest)), "Share_1")
    case = make_case(env.outgoing, ["Share_1"], files=3)

    result = env.dispatch(case)

    assert result["location"] == "success"
    done = env.success / case.name
    assert done.is_dir()
    assert not case.exists()
    assert not (done / ".processing").exists()
    assert env.task(done)["dispatch"]["status"]["Share_1"]["state"] == "complete"
    [copy] = _received(dest)
    assert (copy / ".complete").exists()
    assert not (copy / ".processing").exists()
    sent = sorted(p.name for p in copy.glob("*.dcm"))
    assert sent == sorted(p.name for p in done.glob("*.dcm"))
    for name in sent:
        assert (copy / name).read_bytes() == (done / name).read_bytes()


def test_partial_failure_resends_only_failed_target(env: DispatchEnv, tmp_path: Path) -> None:
    good = tmp_path / "good"
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("a regular file: nothing can be created below it")
    env.save_target(FolderTarget(folder=str(good)), "good")
    env.save_target(FolderTarget(folder=str(blocker / "sub")), "bad")
    env.save_settings(retry_max=5, retry_delay=0.0)
    case = make_case(env.outgoing, ["good", "bad"])

    first = env.dispatch(case)

    assert first["location"] == "outgoing"
    task = env.task(case)
    assert task["dispatch"]["status"]["good"]["state"] == "complete"
    assert task["dispatch"]["status"]["bad"]["state"] == "error"
    assert task["dispatch"]["status"]["bad"]["message"]
    assert task["dispatch"]["retries"] == 1
    assert not (case / ".processing").exists()
    assert len(_received(good)) == 1

    fixed = tmp_path / "fixed"
    env.save_target(FolderTarget(folder=str(fixed)), "bad")
    second = env.dispatch(case)

    assert second["location"] == "success"
    assert len(_received(good)) == 1, "the good target must not get a second copy"
    assert len(_received(fixed)) == 1


def test_dummy_target_and_string_target_name(env: DispatchEnv) -> None:
    env.save_target(DummyTarget(), "dummy")
    case = make_case(env.outgoing, "dummy")
    assert env.dispatch(case)["location"] == "success"
    assert (env.success / case.name).is_dir()
