"""The DCMTK ``dcmsend`` backend of DicomTarget against real peers on 127.0.0.1.

Proves: a case arrives byte-identical through ``dispatch_case`` with dcmsend's own report at the
flow's report path; a rejected association is permanent, a peer that is down transient, a corrupt
``*.dcm`` permanent with the file and the problem named; DIMSE warnings count as sent only when
configured; out-of-resources is transient and other failures permanent; no temporary report is
left behind.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from pynetdicom.dsutils import split_dataset

from blocks._dcmsend_report import parse_report
from blocks.base import SendContext, dicom_files
from blocks.dicom import DicomTarget
from blocks.errors import PermanentTargetError, TransientTargetError
from tasks.taskjson import read_task
from tests.cases import make_case
from tests.dicomfiles import pixel_digest
from tests.dispatch_env import DispatchEnv
from tests.peers.dcmtk import StoreSCP, dcmtk_binary
from tests.peers.net import free_port
from tests.peers.pynetdicom_scp import parrot_scp

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(autouse=True)
def _needs_dcmtk() -> None:
    dcmtk_binary("dcmsend")  # skips locally (fails on CI) without DCMTK


def target(port: int, aet: str = "STORESCP", **fields: object) -> DicomTarget:
    return DicomTarget(ip="127.0.0.1", port=str(port), aet_target=aet, backend="dcmsend", **fields)


def context(case: Path, report: str | None = "sent.txt") -> SendContext:
    _, task = read_task(case)
    return SendContext(case, task, case / report if report else None)


def dataset_bytes(path: Path) -> bytes:
    """The data set after the file meta: what C-STORE carries, and what storescp must keep."""
    return path.read_bytes()[split_dataset(path)[1] :]


def leftovers(case: Path) -> list[str]:
    return sorted(p.name for p in case.iterdir() if p.name.endswith(".tmp"))


def test_auto_sends_with_dcmsend_through_dispatch_case(env: DispatchEnv, tmp_path: Path) -> None:
    with StoreSCP(tmp_path / "pacs") as scp:
        env.save_target(DicomTarget(ip="127.0.0.1", port=str(scp.port), aet_target="STORESCP"), "a")
        case = make_case(env.outgoing, ["a"], files=3)
        result = env.dispatch(case)
        assert result["location"] == "success", result
        assert len(scp.received()) == 3
    assert result["targets"]["a"]["extra"]["backend"] == "dcmsend"
    summary = parse_report((env.success / case.name / "sent.txt").read_text())["summary"]
    assert summary["successful"] == 3


def test_case_arrives_byte_identical_through_dispatch_case(
    env: DispatchEnv, tmp_path: Path
) -> None:
    with StoreSCP(tmp_path / "pacs") as scp:
        env.save_target(target(scp.port), "PACS_Main")
        case = make_case(env.outgoing, ["PACS_Main"], files=7, rows=64, cols=64)
        sent = {pixel_digest(p)[0]: dataset_bytes(p) for p in dicom_files(case)}
        (case / "sent.txt").write_text("a report of an earlier attempt")

        result = env.dispatch(case)

        assert result["location"] == "success", result
        received = {uid: dataset_bytes(path) for uid, path in scp.received().items()}
    assert received == sent
    assert result["targets"]["PACS_Main"]["extra"]["backend"] == "dcmsend"
    done = env.success / case.name
    text = (done / "sent.txt").read_text()
    assert text.startswith("Detailed Report on the Transfer of Instances")
    assert f"Communication Peer : 127.0.0.1:{scp.port}" in text
    assert "AE Titles used     : DCMSEND -> STORESCP" in text
    summary = parse_report(text)["summary"]
    assert summary["sop_instances"] == summary["successful"] == 7
    assert leftovers(done) == []
    assert env.task(done)["dispatch"]["status"]["PACS_Main"]["state"] == "complete"


def test_send_without_report_path_leaves_nothing_behind(tmp_path: Path) -> None:
    case = make_case(tmp_path / "outgoing", ["pacs"], files=3)
    before = sorted(p.name for p in case.iterdir())
    with StoreSCP(tmp_path / "pacs") as scp:
        result = target(scp.port).send(context(case, report=None))
        assert len(scp.received()) == 3
    assert result.files == 3
    assert result.bytes == sum(len(dataset_bytes(p)) for p in dicom_files(case))
    assert sorted(p.name for p in case.iterdir()) == before


def test_rejected_association_is_permanent(tmp_path: Path) -> None:
    case = make_case(tmp_path / "outgoing", ["pacs"])
    with StoreSCP(tmp_path / "pacs", refuse=True) as scp:
        with pytest.raises(PermanentTargetError) as caught:
            target(scp.port).send(context(case))
    message = str(caught.value)
    assert "Rejected" in message
    assert f"127.0.0.1:{scp.port}" in message
    assert "\n" not in message
    assert not (case / "sent.txt").exists()
    assert leftovers(case) == []


def test_rejected_association_through_the_flow_is_retried_later(
    env: DispatchEnv, tmp_path: Path
) -> None:
    with StoreSCP(tmp_path / "pacs", refuse=True) as scp:
        task = env.dispatch_rejected(target(scp.port), "pacs")
    assert "rejected" in task["dispatch"]["status"]["pacs"]["message"].lower()


def test_peer_down_is_transient_and_quick(tmp_path: Path) -> None:
    case = make_case(tmp_path / "outgoing", ["pacs"])
    started = time.monotonic()
    with pytest.raises(TransientTargetError) as caught:
        target(free_port(), connect_timeout=2).send(context(case))
    assert time.monotonic() - started < 5
    message = str(caught.value)
    assert "EXITCODE_CANNOT_NEGOTIATE_ASSOCIATION" in message
    assert "refused" in message.lower()


def test_corrupt_file_is_permanent_and_named(tmp_path: Path) -> None:
    case = make_case(tmp_path / "outgoing", ["pacs"], files=3)
    (case / "broken.dcm").write_bytes(b"this is not DICOM")
    with StoreSCP(tmp_path / "pacs") as scp:
        with pytest.raises(PermanentTargetError) as caught:
            target(scp.port).send(context(case))
        assert scp.received() == {}
    message = str(caught.value)
    assert "EXITCODE_INVALID_INPUT_FILE" in message
    assert "broken.dcm" in message
    assert "File meta information header missing" in message
    assert "\n" not in message


def test_warnings_count_as_sent_only_when_configured(tmp_path: Path) -> None:
    case = make_case(tmp_path / "outgoing", ["pacs"], files=3)
    files = dicom_files(case)
    warned = pixel_digest(files[1])[0]
    with parrot_scp({warned: 0xB000}) as scp:
        result = target(scp.port, scp.aet).send(context(case))
        assert result.files == 3
        summary = parse_report((case / "sent.txt").read_text())["summary"]
        assert summary["successful"] == 2  # mercure's parser alone would call this a failure

        strict = target(scp.port, scp.aet, warning_counts_as_sent=False)
        with pytest.raises(PermanentTargetError) as caught:
            strict.send(context(case))
    assert "only 2 out of 3 instances were sent successfully" in str(caught.value)
    assert files[1].name in str(caught.value)
    assert "0xb000" in str(caught.value)


@pytest.mark.parametrize(
    ("status", "error"),
    [(0xA700, TransientTargetError), (0xC000, PermanentTargetError)],
)
def test_failure_statuses(tmp_path: Path, status: int, error: type[Exception]) -> None:
    case = make_case(tmp_path / "outgoing", ["pacs"], files=3)
    failing = pixel_digest(dicom_files(case)[0])[0]
    with parrot_scp({failing: status}) as scp:
        with pytest.raises(error) as caught:
            target(scp.port, scp.aet).send(context(case))
    assert f"0x{status:04x}" in str(caught.value)
    assert leftovers(case) == []


def test_connection_test_reports_dcmsend(tmp_path: Path) -> None:
    with StoreSCP(tmp_path / "pacs") as scp:
        result = target(scp.port).test_connection()
    assert result == {"ping": True, "c-echo": True, "loopback_mode": False, "dcmsend": True}
    assert DicomTarget.connection_ok(result)
    assert not DicomTarget.connection_ok({**result, "dcmsend": False})


def test_parallel_cases_wait_for_a_one_association_peer_instead_of_timing_out(
    env: DispatchEnv, tmp_path: Path
) -> None:
    """storescp without --fork serves one association at a time; each store takes 1 s here and
    the ACSE timeout is 1 s, so an association opened while another runs would time out. With
    the default ``concurrent_associations`` (1) the cases wait before connecting and all arrive
    first time (without the gate, associations fail with "DUL network read timeout")."""
    import asyncio

    from blocks.settings import DispatcherSettings
    from flows.sweep import Dispatcher

    env.save_settings(num_proc=3)
    with StoreSCP(tmp_path / "pacs", extra_args=["--sleep-during", "1"]) as scp:
        env.save_target(target(scp.port, acse_timeout=1), "slow_pacs")
        cases = [make_case(env.outgoing, ["slow_pacs"], files=1) for _ in range(3)]
        result = asyncio.run(Dispatcher(DispatcherSettings.load("default")).one_pass())
        assert len(scp.received()) == 3
    assert result.dispatched == result.succeeded == 3, result
    for case in cases:
        assert env.task(env.success / case.name)["dispatch"].get("retries", 0) in (0, None)
