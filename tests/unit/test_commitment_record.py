"""Storage Commitment records beside a case: what is committed, failed, pending, expired.

Proves: an answer is recorded only for a transaction the case asked about, and only once;
records are never written or read through a link; committed wins over an earlier failure or
silence; an unanswered request stops counting as pending after the timeout (so the next
attempt sends those instances again); each target sees only its own transactions; the
listener is built only for targets with storage_commitment on, and never on port 0.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from blocks._commitment_record import (
    CommitmentReport,
    CommitmentRequest,
    commitment_state,
    find_request,
    record_report,
    record_request,
    report_path,
    request_path,
)
from blocks.commitment_listener import commitment_listener
from blocks.dicom import DicomTarget

CT = "1.2.840.10008.5.1.4.1.1.2"


def ask(case: Path, uid: str, instances: list[str], at: float, target: str = "pacs") -> None:
    record_request(case, CommitmentRequest(uid, target, tuple((CT, i) for i in instances), at))


def answer(case: Path, uid: str, ok: list[str], failed: list[str] = ()) -> bool:  # type: ignore[assignment]
    report = CommitmentReport(
        uid, tuple((CT, i) for i in ok), tuple((CT, i, 0x0110) for i in failed), 0.0, "test"
    )
    return record_report(case, report)


def test_answers_fold_into_committed_failed_pending(tmp_path: Path) -> None:
    ask(tmp_path, "1.1", ["a1", "a2", "a3"], at=100)
    assert answer(tmp_path, "1.1", ["a1", "a2"], ["a3"])
    state = commitment_state(tmp_path, "pacs", timeout=60, now=110)
    assert (state.committed, state.failed, state.pending) == ({"a1", "a2"}, {"a3": 0x0110}, set())
    assert state.counts(["a1", "a2", "a3"]) == {
        "instances": 3,
        "committed": 2,
        "failed": 1,
        "pending": 0,
        "transaction_uid": "1.1",
    }
    ask(tmp_path, "1.2", ["a3"], at=120)  # the retry asks again for the failed one
    state = commitment_state(tmp_path, "pacs", timeout=60, now=121)
    assert state.pending == {"a3"}
    assert state.failed == {}
    assert state.settled("a3")
    assert not state.settled("zz")
    assert answer(tmp_path, "1.2", ["a3"])
    state = commitment_state(tmp_path, "pacs", timeout=60, now=122)
    assert state.committed == {"a1", "a2", "a3"}
    assert state.transaction_uid == "1.2"


def test_silence_past_the_timeout_is_no_longer_pending(tmp_path: Path) -> None:
    ask(tmp_path, "2.1", ["b1"], at=100)
    assert commitment_state(tmp_path, "pacs", timeout=10, now=105).pending == {"b1"}
    late = commitment_state(tmp_path, "pacs", timeout=10, now=111)
    assert late.pending == set()
    assert late.expired == {"b1"}
    assert not late.settled("b1")
    assert answer(tmp_path, "2.1", ["b1"])  # a late answer for a recorded transaction counts
    assert commitment_state(tmp_path, "pacs", timeout=10, now=200).committed == {"b1"}


def test_unknown_transaction_and_second_answer_are_ignored(tmp_path: Path) -> None:
    ask(tmp_path, "3.1", ["c1"], at=100)
    assert not answer(tmp_path, "3.9", ["c1"])  # nobody asked
    assert not report_path(tmp_path, "3.9").exists()
    assert not answer(tmp_path, "not a uid/../x", ["c1"])
    assert answer(tmp_path, "3.1", [], ["c1"])
    assert not answer(tmp_path, "3.1", ["c1"])  # the first answer stands
    assert commitment_state(tmp_path, "pacs", timeout=60, now=101).failed == {"c1": 0x0110}


def test_targets_see_their_own_transactions(tmp_path: Path) -> None:
    ask(tmp_path, "4.1", ["d1"], at=100, target="pacs")
    ask(tmp_path, "4.2", ["d1"], at=100, target="archive")
    answer(tmp_path, "4.2", ["d1"])
    assert commitment_state(tmp_path, "pacs", timeout=60, now=101).pending == {"d1"}
    assert commitment_state(tmp_path, "archive", timeout=60, now=101).committed == {"d1"}


def test_records_never_go_through_a_link(tmp_path: Path) -> None:
    victim = tmp_path / "victim"
    victim.write_text("keep")
    case = tmp_path / "case"
    case.mkdir()
    os.symlink(victim, request_path(case, "5.1"))
    with pytest.raises(FileExistsError):
        ask(case, "5.1", ["e1"], at=100)
    assert victim.read_text() == "keep"
    assert commitment_state(case, "pacs", timeout=60, now=101).pending == set()  # not read
    ask(case, "5.2", ["e1"], at=100)
    os.symlink(victim, report_path(case, "5.2"))
    assert not answer(case, "5.2", ["e1"])
    assert victim.read_text() == "keep"


def test_the_case_of_a_transaction_is_found(tmp_path: Path) -> None:
    outgoing, error = tmp_path / "outgoing", tmp_path / "error"
    (outgoing / "case-a").mkdir(parents=True)
    (error / "case-b").mkdir(parents=True)
    ask(error / "case-b", "6.1", ["f1"], at=100)
    assert find_request([outgoing, error], "6.1") == error / "case-b"
    assert find_request([outgoing, error], "6.2") is None
    assert find_request([outgoing], "*") is None


def test_listener_only_for_targets_that_use_it(monkeypatch: pytest.MonkeyPatch) -> None:
    on = DicomTarget(target_name="pacs", ip="127.0.0.1", storage_commitment="require")
    off = DicomTarget(target_name="other", ip="127.0.0.1")
    sender = DicomTarget(target_name="back", ip="sender", storage_commitment="request")
    monkeypatch.setenv("DICOM_DISPATCH_STORAGE_COMMITMENT_PORT", "12345")
    monkeypatch.delenv("DICOM_DISPATCH_STORAGE_COMMITMENT_AET", raising=False)
    assert commitment_listener([off, sender], list) is None
    listener = commitment_listener([on, off, sender], list)
    assert listener is not None
    assert listener.port == 12345
    assert [(r.target, r.our_aet) for r in listener.routes] == [("pacs", "DCMSEND")]
    monkeypatch.setenv("DICOM_DISPATCH_STORAGE_COMMITMENT_AET", "ROUTER")
    listener = commitment_listener([on], list)
    assert listener is not None
    assert listener.routes[0].our_aet == "ROUTER"
    monkeypatch.setenv("DICOM_DISPATCH_STORAGE_COMMITMENT_PORT", "0")
    assert commitment_listener([on], list) is None


def test_metrics_label_each_target_by_its_commitment_outcome(tmp_path: Path) -> None:
    from flows.dispatch import CaseOutcome
    from flows.metrics import _commitment_counts, commitment_outcome
    from tests.cases import make_case

    case = make_case(tmp_path, ["pacs", "archive"], files=1)
    raw = json.loads((case / "task.json").read_text())
    counts = {"instances": 3, "committed": 2, "failed": 0, "pending": 1, "transaction_uid": "1"}
    raw["dispatch"]["status"]["pacs"]["storage_commitment"] = counts
    (case / "task.json").write_text(json.dumps(raw))
    outcome = CaseOutcome("c", "outgoing", str(case), targets={"pacs": {}, "archive": {}})
    assert _commitment_counts(outcome) == {"pacs": counts}
    assert commitment_outcome(counts) == "pending"
    assert commitment_outcome({**counts, "failed": 1}) == "failed"
    assert commitment_outcome({**counts, "committed": 3, "pending": 0}) == "committed"


def test_the_target_outcome_keeps_the_commitment_counts(tmp_path: Path) -> None:
    from tasks import casefolder as cf
    from tasks.taskjson import read_task_raw, update_task
    from tests.cases import make_case

    case = make_case(tmp_path, "pacs", files=1)
    counts = {"instances": 1, "committed": 0, "failed": 0, "pending": 1, "transaction_uid": "1"}

    def record(raw: dict[str, object]) -> None:
        raw["dispatch"]["status"]["pacs"]["storage_commitment"] = counts  # type: ignore[index]

    update_task(case, record)
    cf.set_target_status(case, "pacs", "error", "not committed")
    entry = read_task_raw(case)["dispatch"]["status"]["pacs"]
    assert entry["state"] == "error"
    assert entry["storage_commitment"] == counts


def test_records_are_not_copied_to_file_targets(tmp_path: Path) -> None:
    from blocks.folder import case_files

    (tmp_path / "a.dcm").write_bytes(b"x")
    ask(tmp_path, "7.1", ["g1"], at=100)
    answer(tmp_path, "7.1", ["g1"])
    assert case_files(tmp_path, "") == [Path("a.dcm")]
