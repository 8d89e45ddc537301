"""tasks/casefolder.py, a case leaving outgoing/ (to success/ or error/) and coming back
(restart), and the targets a case names."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import pytest

from tasks.casefolder import (
    ERROR,
    LOCK,
    PROCESSING,
    REASON_FILE,
    case_targets,
    claim_case,
    move_case,
    restart_case,
)
from tasks.taskjson import TaskFileError, parse_task

from .casefolder_helpers import load, scan, task_with
from .mercure_task import MERCURE_TASK

# --------------------------------------------------------------------------------------------
# moves


def tree(path: Path) -> list[str]:
    return sorted(p.name for p in path.iterdir())


def test_move_to_success_keeps_name_and_files(make_case, tmp_path):
    case = make_case()
    (case / "sent.txt").write_text("report")
    claim_case(case)
    files = sorted(set(tree(case)) - {PROCESSING})
    task_before = load(case)

    dest = move_case(case, tmp_path / "success")

    assert dest == tmp_path / "success" / case.name
    assert not case.exists()
    assert tree(dest) == files
    assert load(dest) == task_before


def test_move_collision_gets_isoformat_suffix(make_case, tmp_path):
    success = tmp_path / "success"
    (success / MERCURE_TASK["id"]).mkdir(parents=True)
    case = make_case()

    dest = move_case(case, success)

    prefix = f"{case.name}_"
    assert dest.parent == success
    assert dest.name.startswith(prefix)
    stamp = dt.datetime.fromisoformat(dest.name[len(prefix) :])
    assert abs((dt.datetime.now() - stamp).total_seconds()) < 60
    assert (success / case.name).is_dir()  # the earlier one is untouched
    assert (dest / "task.json").is_file()


def test_move_to_error_writes_fail_stage_reason_and_reason_file(make_case, tmp_path):
    case = make_case()
    claim_case(case)

    dest = move_case(case, tmp_path / "error", fail_stage="DISPATCHING", reason="pacs: refused")

    raw = load(dest)
    assert raw["info"]["fail_stage"] == "DISPATCHING"
    assert raw["info"]["fail_reason"] == "pacs: refused"
    assert '"fail_stage": "DISPATCHING"' in (dest / "task.json").read_text()
    assert (dest / REASON_FILE).read_text() == "pacs: refused\n"
    assert not (dest / PROCESSING).exists()
    assert parse_task(raw).info.fail_stage == "DISPATCHING"


def test_move_to_error_keeps_unknown_keys(make_case, tmp_path):
    raw = task_with()
    raw["info"]["ward"] = "ICU"
    raw["site_extension"] = [1, 2]
    case = make_case(task=raw)

    dest = move_case(case, tmp_path / "error", fail_stage="DISPATCHING", reason="x")

    after = load(dest)
    assert after["info"]["ward"] == "ICU"
    assert after["site_extension"] == [1, 2]


def test_move_reason_file_ends_with_one_newline(make_case, tmp_path):
    case = make_case()

    dest = move_case(case, tmp_path / "error", fail_stage="DISPATCHING", reason="a\nb\n\n  ")

    assert (dest / REASON_FILE).read_text() == "a\nb\n"


def test_move_removes_processing(make_case, tmp_path):
    case = make_case()
    claim_case(case)

    dest = move_case(case, tmp_path / "success")

    assert not (dest / PROCESSING).exists()
    assert not (dest / REASON_FILE).exists()


def test_move_with_invalid_task_json_still_writes_reason(make_case, tmp_path):
    case = make_case(text="{broken")

    dest = move_case(case, tmp_path / "error", fail_stage="DISPATCHING", reason="invalid task")

    assert (dest / "task.json").read_text() == "{broken"
    assert (dest / REASON_FILE).read_text() == "invalid task\n"


def test_move_without_task_json_still_writes_reason(make_case, tmp_path):
    case = make_case(task=None)

    dest = move_case(case, tmp_path / "error", fail_stage="DISPATCHING", reason="no task")

    assert not (dest / "task.json").exists()
    assert (dest / REASON_FILE).read_text() == "no task\n"


# --------------------------------------------------------------------------------------------
# restart


@pytest.fixture
def failed_case(make_case, tmp_path) -> Path:
    """A two-target case in error/ after mercure gave up: pacs complete, archive failed."""
    raw = task_with(
        target_name=["pacs", "archive"],
        status={
            "pacs": {"state": "complete", "time": "2025-03-01 10:00:00"},
            "archive": {"state": "error", "time": "2025-03-01 11:00:00", "message": "refused"},
        },
        retries=4,
        next_retry_at=1_740_830_000.0,
    )
    raw["info"]["fail_stage"] = "DISPATCHING"
    raw["info"]["fail_reason"] = "archive: refused"
    case = make_case(task=raw, parent=tmp_path / "error")
    (case / REASON_FILE).write_text("archive: refused\n")
    return case


def test_restart_resets_retries_and_fail_stage_keeps_complete(failed_case, outgoing):
    status_before = load(failed_case)["dispatch"]["status"]

    dest = restart_case(failed_case, outgoing)

    assert dest == outgoing / failed_case.name
    assert not failed_case.exists()
    raw = load(dest)
    assert raw["dispatch"]["retries"] is None
    assert raw["dispatch"]["next_retry_at"] is None
    assert "fail_stage" in raw["info"]
    assert raw["info"]["fail_stage"] is None
    assert "fail_reason" not in raw["info"]
    assert raw["dispatch"]["status"] == status_before
    assert not (dest / REASON_FILE).exists()
    assert not (dest / LOCK).exists()


def test_restarted_case_is_ready_again(failed_case, outgoing):
    restart_case(failed_case, outgoing)

    assert [c.path.name for c in scan(outgoing).ready] == [failed_case.name]


def test_restart_does_not_add_a_missing_fail_stage(make_case, tmp_path, outgoing):
    raw = task_with()
    del raw["info"]["fail_stage"]
    case = make_case(task=raw, parent=tmp_path / "error")

    dest = restart_case(case, outgoing)

    assert "fail_stage" not in load(dest)["info"]


@pytest.mark.parametrize("marker", [LOCK, ERROR, PROCESSING])
def test_restart_refuses_when_a_marker_exists(failed_case, outgoing, marker):
    (failed_case / marker).touch()
    before = (failed_case / "task.json").read_bytes()

    with pytest.raises(TaskFileError, match=marker):
        restart_case(failed_case, outgoing)

    assert (failed_case / "task.json").read_bytes() == before
    assert list(outgoing.iterdir()) == []


def test_restart_refuses_when_destination_exists(failed_case, outgoing):
    (outgoing / failed_case.name).mkdir()
    before = (failed_case / "task.json").read_bytes()

    with pytest.raises(TaskFileError, match="already exists"):
        restart_case(failed_case, outgoing)

    assert (failed_case / "task.json").read_bytes() == before
    assert not (failed_case / LOCK).exists()
    assert list((outgoing / failed_case.name).iterdir()) == []


def test_restart_refuses_process_action(make_case, tmp_path, outgoing):
    raw = task_with()
    raw["info"]["action"] = "process"
    case = make_case(task=raw, parent=tmp_path / "error")

    with pytest.raises(TaskFileError, match="'process'"):
        restart_case(case, outgoing)

    assert case.is_dir()
    assert not (case / LOCK).exists()


def test_restart_accepts_both_action(make_case, tmp_path, outgoing):
    raw = task_with()
    raw["info"]["action"] = "both"
    case = make_case(task=raw, parent=tmp_path / "error")

    assert restart_case(case, outgoing).is_dir()


def test_restart_refuses_without_task_json(make_case, tmp_path, outgoing):
    case = make_case(task=None, parent=tmp_path / "error")

    with pytest.raises(TaskFileError, match="missing"):
        restart_case(case, outgoing)

    assert case.is_dir()


@pytest.mark.parametrize("dispatch", [{}, None, {"target_name": ["pacs"]}])
def test_restart_refuses_without_dispatch_status_and_leaves_no_lock(
    make_case, tmp_path, outgoing, dispatch
):
    # mercure's "no_dispatch_status"; a refusal must not leave a .lock that blocks later restarts.
    raw = task_with()
    raw["dispatch"] = dispatch
    case = make_case(task=raw, parent=tmp_path / "error")

    with pytest.raises(TaskFileError, match="no dispatch status"):
        restart_case(case, outgoing)

    assert not (case / LOCK).exists()
    assert list(outgoing.iterdir()) == []


def test_restart_with_null_info_is_a_task_file_error(make_case, tmp_path, outgoing):
    case = make_case(task={"info": None, "id": "x"}, parent=tmp_path / "error")

    with pytest.raises(TaskFileError):
        restart_case(case, outgoing)

    assert not (case / LOCK).exists()


# --------------------------------------------------------------------------------------------
# case_targets


def test_case_targets(make_case):
    case = make_case(task=task_with(target_name="pacs"))

    assert case_targets(case) == ["pacs"]


def test_case_targets_of_invalid_case_is_empty(make_case):
    assert case_targets(make_case(text="{")) == []
