"""tasks/taskjson.py: validation of mercure's task.json and its atomic read-modify-write."""

from __future__ import annotations

import json
import os
import re
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from blocks.errors import CaseError
from tasks import safefiles
from tasks.taskjson import (
    TaskFileError,
    now_str,
    parse_task,
    read_task,
    read_task_raw,
    target_names,
    update_task,
    write_task,
)


def load(case: Path) -> dict[str, Any]:
    return json.loads((case / "task.json").read_text(encoding="utf-8"))


def leftovers(case: Path) -> list[str]:
    return sorted(p.name for p in case.iterdir() if p.name.endswith(".tmp"))


# --------------------------------------------------------------------------------------------
# parsing


def test_mercure_example_parses(task_dict):
    task = parse_task(task_dict)

    assert task.id == "6f1c2a3e-f6e1-11ef-9a3b-0242ac120002"
    assert task.info.action == "route"
    assert task.info.uid_type == "series"
    assert task.info.triggered_rules == {"ct_to_pacs": True}
    assert task.info.sender_aet == "CT_SCANNER_1"
    assert task.dispatch is not None
    assert task.dispatch.target_name == ["pacs"]
    assert task.dispatch.status["pacs"].state == "waiting"
    assert task.dispatch.retries is None
    assert task.dispatch.next_retry_at is None
    assert target_names(task) == ["pacs"]


def test_read_task_returns_raw_dict_and_typed_view(make_case, task_dict):
    case = make_case()

    raw, task = read_task(case)

    assert raw == task_dict
    assert task.info.mrn == "123456"


def test_pretty_printed_task_json_is_read_too(make_case, task_dict):
    # mercure's processor rewrites task.json with indent=4; formatting is not the contract.
    case = make_case(text=json.dumps(task_dict, indent=4))

    assert read_task(case)[1].id == task_dict["id"]


def test_optional_info_fields_get_mercure_defaults(task_dict):
    for key in ("sender_address", "sender_aet", "receiver_aet", "applied_rule", "patient_name"):
        del task_dict["info"][key]

    info = parse_task(task_dict).info

    assert (info.sender_address, info.sender_aet, info.receiver_aet) == ("MISSING",) * 3
    assert info.applied_rule is None
    assert info.patient_name is None


def test_triggered_rules_may_be_a_string(task_dict):
    # mercure's own tests write triggered_rules as "".
    task_dict["info"]["triggered_rules"] = ""

    assert parse_task(task_dict).info.triggered_rules == ""


def test_missing_id_is_a_readable_task_file_error(task_dict):
    del task_dict["id"]

    with pytest.raises(TaskFileError, match=r"task\.json has invalid format: id: Field required"):
        parse_task(task_dict)


def test_task_file_error_is_a_case_error():
    assert issubclass(TaskFileError, CaseError)


@pytest.mark.parametrize(
    "field",
    [
        "action",
        "uid",
        "uid_type",
        "triggered_rules",
        "mrn",
        "acc",
        "mercure_version",
        "mercure_appliance",
        "mercure_server",
    ],
)
def test_missing_required_info_field_is_named(task_dict, field):
    del task_dict["info"][field]

    with pytest.raises(TaskFileError, match=rf"info\.{field}: Field required"):
        parse_task(task_dict)


def test_missing_info_section_is_named(task_dict):
    del task_dict["info"]

    with pytest.raises(TaskFileError, match=r"info: Field required"):
        parse_task(task_dict)


@pytest.mark.parametrize(
    ("path", "value"),
    [
        pytest.param(("info", "action"), "teleport", id="action"),
        pytest.param(("dispatch", "status", "pacs", "state"), "sent", id="status_state"),
        pytest.param(("info", "fail_stage"), "SOMEWHERE", id="fail_stage"),
    ],
)
def test_unknown_value_is_rejected_and_named(task_dict, path, value):
    *parents, key = path
    node = task_dict
    for part in parents:
        node = node[part]
    node[key] = value

    with pytest.raises(TaskFileError, match=re.escape(".".join(path))):
        parse_task(task_dict)


def test_error_message_counts_the_errors(task_dict):
    del task_dict["id"]
    del task_dict["info"]["mrn"]

    with pytest.raises(TaskFileError, match=r"\(2 error\(s\)\)"):
        parse_task(task_dict)


def test_bad_json_is_a_readable_task_file_error(make_case):
    case = make_case(text='{"info": {"action": "route",')

    with pytest.raises(TaskFileError, match=r"task\.json is not valid JSON: .*line 1"):
        read_task(case)


@pytest.mark.parametrize("text", ["[]", '"task"', "42", "null"])
def test_non_object_json_is_a_task_file_error(make_case, text):
    case = make_case(text=text)

    with pytest.raises(TaskFileError, match=r"task\.json must hold a JSON object"):
        read_task_raw(case)


def test_missing_task_json_is_a_task_file_error(make_case):
    case = make_case(task=None)

    with pytest.raises(TaskFileError, match=r"task\.json is missing"):
        read_task(case)


def test_unreadable_task_json_is_a_task_file_error(make_case):
    case = make_case(task=None)
    (case / "task.json").mkdir()  # reading a directory fails with an OSError other than ENOENT

    with pytest.raises(TaskFileError, match=r"task\.json cannot be read"):
        read_task(case)


def test_string_target_name_becomes_one_element_list(task_dict):
    task_dict["dispatch"]["target_name"] = "pacs"

    assert target_names(parse_task(task_dict)) == ["pacs"]


def test_target_names_keep_their_order(task_dict):
    task_dict["dispatch"]["target_name"] = ["pacs", "archive", "research"]

    assert target_names(parse_task(task_dict)) == ["pacs", "archive", "research"]


def test_empty_dispatch_section_means_no_dispatch(task_dict):
    task_dict["dispatch"] = {}

    task = parse_task(task_dict)

    assert task.dispatch is None
    assert target_names(task) == []


def test_missing_dispatch_section_means_no_dispatch(task_dict):
    del task_dict["dispatch"]

    assert parse_task(task_dict).dispatch is None


def test_dispatch_without_target_name_is_invalid(task_dict):
    del task_dict["dispatch"]["target_name"]

    with pytest.raises(TaskFileError, match=r"dispatch\.target_name"):
        parse_task(task_dict)


def test_unknown_keys_are_accepted_at_every_level(task_dict):
    # mercure forbids unknown top-level keys; we accept them (architecture §4.1).
    task_dict["site_extension"] = {"ticket": 17}
    task_dict["info"]["ward"] = "ICU"
    task_dict["dispatch"]["status"]["pacs"]["message"] = "connection refused"

    assert parse_task(task_dict).id == task_dict["id"]


# --------------------------------------------------------------------------------------------
# update_task / write_task


def test_update_task_preserves_unknown_keys_top_level_and_nested(make_case, task_dict):
    task_dict["site_extension"] = {"ticket": 17, "tags": ["a", "b"]}
    task_dict["info"]["ward"] = "ICU"
    task_dict["dispatch"]["priority_hint"] = 3
    task_dict["dispatch"]["status"]["pacs"]["message"] = "connection refused"
    task_dict["process"] = {"module_name": "m", "settings": {"x": 1}, "retain_input_images": False}
    case = make_case(task=task_dict)

    update_task(case, lambda raw: raw["dispatch"].update(retries=1))

    after = load(case)
    assert after["dispatch"]["retries"] == 1
    assert after["site_extension"] == {"ticket": 17, "tags": ["a", "b"]}
    assert after["info"]["ward"] == "ICU"
    assert after["dispatch"]["priority_hint"] == 3
    assert after["dispatch"]["status"]["pacs"]["message"] == "connection refused"
    assert after["process"] == task_dict["process"]


def test_update_task_rewrites_every_mercure_field_unchanged(make_case, task_dict):
    case = make_case(task=task_dict)

    update_task(case, lambda raw: None)

    assert load(case) == task_dict


def test_update_task_returns_the_written_dict(make_case):
    case = make_case()

    raw = update_task(case, lambda raw: raw["dispatch"].update(retries=2))

    assert raw == load(case)


def test_update_task_rereads_the_file(make_case):
    # Edits made on disk by someone else since our last read survive our update.
    case = make_case()
    raw = read_task_raw(case)
    raw["info"]["acc"] = "EDITED-ELSEWHERE"
    write_task(case, raw)

    update_task(case, lambda raw: raw["dispatch"].update(retries=1))

    assert load(case)["info"]["acc"] == "EDITED-ELSEWHERE"


def test_write_leaves_no_temp_file_and_valid_json(make_case):
    case = make_case()
    before = sorted(p.name for p in case.iterdir())

    update_task(case, lambda raw: raw["dispatch"].update(retries=3))

    assert sorted(p.name for p in case.iterdir()) == before
    assert load(case)["dispatch"]["retries"] == 3


def test_failing_change_leaves_the_old_file(make_case):
    case = make_case()
    before = (case / "task.json").read_bytes()

    def change(raw: dict[str, Any]) -> None:
        raw["dispatch"]["retries"] = 99
        raise RuntimeError("change failed half-way")

    with pytest.raises(RuntimeError):
        update_task(case, change)

    assert (case / "task.json").read_bytes() == before
    assert leftovers(case) == []


def test_unserialisable_change_leaves_the_old_file(make_case):
    case = make_case()
    before = (case / "task.json").read_bytes()

    with pytest.raises(TypeError):
        update_task(case, lambda raw: raw.update(bad=object()))

    assert (case / "task.json").read_bytes() == before
    assert leftovers(case) == []


def test_failed_rename_leaves_the_old_file_and_no_temp_file(make_case, monkeypatch):
    case = make_case()
    before = (case / "task.json").read_bytes()

    def broken_replace(src: Any, dst: Any) -> None:
        assert Path(src).exists()  # the new content was fully written before the rename
        raise OSError("rename failed")

    monkeypatch.setattr(safefiles.os, "replace", broken_replace)

    with pytest.raises(OSError, match="rename failed"):
        update_task(case, lambda raw: raw["dispatch"].update(retries=1))

    assert (case / "task.json").read_bytes() == before
    assert leftovers(case) == []


def test_write_replaces_the_file_rather_than_rewriting_it(make_case):
    # A reader holding the old file keeps a complete old version: the inode is new.
    case = make_case()
    old_inode = os.stat(case / "task.json").st_ino

    update_task(case, lambda raw: raw["dispatch"].update(retries=1))

    assert os.stat(case / "task.json").st_ino != old_inode


def test_update_task_on_missing_file_raises_and_creates_nothing(make_case):
    case = make_case(task=None)

    with pytest.raises(TaskFileError, match="missing"):
        update_task(case, lambda raw: None)

    assert not (case / "task.json").exists()


def test_fail_stage_is_written_as_plain_string(make_case):
    # mercure's quirk (§1.10): its enum could not be serialised once read back.
    case = make_case()

    update_task(case, lambda raw: raw["info"].update(fail_stage="DISPATCHING"))

    assert '"fail_stage": "DISPATCHING"' in (case / "task.json").read_text()
    raw, task = read_task(case)
    assert task.info.fail_stage == "DISPATCHING"
    update_task(case, lambda raw: raw["dispatch"].update(retries=1))  # rewrite works
    assert load(case)["info"]["fail_stage"] == "DISPATCHING"


def test_concurrent_updates_in_one_process_are_not_lost(make_case):
    case = make_case()
    update_task(case, lambda raw: raw.update(counter=0))

    def bump() -> None:
        for _ in range(10):
            update_task(case, lambda raw: raw.update(counter=raw["counter"] + 1))

    threads = [threading.Thread(target=bump) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()

    assert load(case)["counter"] == 40
    assert leftovers(case) == []


# --------------------------------------------------------------------------------------------
# now_str


def test_now_str_is_mercures_local_time_format():
    stamp = 1_740_823_200.0

    assert now_str(stamp) == time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(stamp))
    assert re.fullmatch(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d", now_str())
