"""Storage Commitment of a DICOM target against real peers on 127.0.0.1.

Proves: with ``storage_commitment: require`` a case is complete only once the receiver
committed every instance: answered on the same association (a scriptable pynetdicom SCP) or on
a new association to our listener (the same SCP, and Orthanc, which always answers that way);
a partial failure re-sends only the failed instances, on both backends; silence until the
timeout leaves the case for a retry that sends everything again; an answer for a transaction
nobody asked about is ignored, one from a node that is no target refused; ``targets test``
says whether the peer accepts the SOP class.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from blocks._association import DicomPeer
from blocks._commitment_record import RECORD_PREFIX
from blocks._commitment_scp import CommitmentListener, ListenRoute
from blocks.base import SendContext, dicom_files
from blocks.dicom import DicomTarget
from blocks.errors import NotCommittedError
from tasks.taskjson import read_task, read_task_raw
from tests.cases import make_case
from tests.peers.commitment_scp import commitment_scp
from tests.peers.dcmtk import dcmtk_binary
from tests.peers.net import free_port
from tests.peers.orthanc import Orthanc
from tests.peers.pynetdicom_scp import parrot_scp

pytestmark = pytest.mark.timeout(120)

OUR_AET = "DISPATCH"


@pytest.fixture(autouse=True)
def _own_data_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The listener's record goes to this test's data directory only."""
    monkeypatch.setenv("DICOM_DISPATCH_HOME", str(tmp_path / "home"))
    (tmp_path / "home").mkdir()


def target(port: int, aet: str, **fields: object) -> DicomTarget:
    values: dict[str, object] = {
        "target_name": "pacs",
        "ip": "127.0.0.1",
        "port": str(port),
        "aet_target": aet,
        "aet_source": OUR_AET,
        "backend": "pynetdicom",
        "storage_commitment": "require",
        "storage_commitment_timeout": 10,
    }
    values.update(fields)
    return DicomTarget(**values)


def context(case: Path) -> SendContext:
    _, task = read_task(case)
    return SendContext(case, task, case / "sent.txt")


def uids(case: Path) -> list[str]:
    from pydicom import dcmread

    return [str(dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in dicom_files(case)]


def commitment_counts(case: Path) -> dict[str, object]:
    entry: dict[str, object] = read_task_raw(case)["dispatch"]["status"]["pacs"]
    return dict(entry["storage_commitment"])  # type: ignore[call-overload]


def reports(case: Path) -> list[dict[str, object]]:
    return [json.loads(p.read_text()) for p in sorted(case.glob(f"{RECORD_PREFIX}*.report.json"))]


@pytest.mark.parametrize("backend", ["pynetdicom", "dcmsend"])
def test_partial_failure_resends_only_the_failed_instances(tmp_path: Path, backend: str) -> None:
    if backend == "dcmsend":
        dcmtk_binary("dcmsend")
    case = make_case(tmp_path / "outgoing", "pacs", files=3)
    first, second, third = uids(case)
    with commitment_scp("same", fail_once={second}) as scp:
        pacs = target(scp.port, scp.aet, backend=backend)
        with pytest.raises(NotCommittedError, match="2 of 3 committed, 1 failed"):
            pacs.send(context(case))
        assert sorted(scp.stored) == sorted([first, second, third])
        counts = commitment_counts(case)
        assert (counts["committed"], counts["failed"], counts["pending"]) == (2, 1, 0)
        assert counts["transaction_uid"] == scp.actions[0][0]

        result = pacs.send(context(case))  # the retry

    assert scp.stored[3:] == [second]  # only the failed instance went again
    assert scp.actions[1][1] == [second]  # and only it was asked about again
    assert result.extra["storage_commitment"]["committed"] == 3
    assert commitment_counts(case)["committed"] == 3
    assert all(r["via"] == "same association" for r in reports(case))


def test_silence_until_the_timeout_leaves_the_case_for_a_retry(tmp_path: Path) -> None:
    case = make_case(tmp_path / "outgoing", "pacs", files=2)
    with commitment_scp("silent") as scp:
        pacs = target(scp.port, scp.aet, storage_commitment_timeout=1.0)
        with pytest.raises(NotCommittedError, match="0 of 2 committed"):
            pacs.send(context(case))
        assert len(scp.stored) == 2
        assert commitment_counts(case)["committed"] == 0
        assert reports(case) == []
        with pytest.raises(NotCommittedError, match="0 of 2 committed"):
            pacs.send(context(case))  # timed out: sent and asked about again
    assert len(scp.stored) == 4
    assert len(scp.actions) == 2
    assert sorted(scp.actions[1][1]) == sorted(uids(case))


def test_request_mode_records_a_missing_answer_as_a_warning(tmp_path: Path) -> None:
    case = make_case(tmp_path / "outgoing", "pacs", files=2)
    with commitment_scp("silent") as scp:
        pacs = target(
            scp.port, scp.aet, storage_commitment="request", storage_commitment_timeout=0.5
        )
        result = pacs.send(context(case))
    assert result.extra["storage_commitment"]["committed"] == 0
    assert len(scp.stored) == 2


def listener_for(port: int, scp_port: int, scp_aet: str, outgoing: Path) -> CommitmentListener:
    node = DicomPeer("127.0.0.1", scp_port, scp_aet, OUR_AET)
    return CommitmentListener(
        port, [ListenRoute(node, OUR_AET, "pacs")], lambda: [outgoing], address="127.0.0.1"
    )


def test_answer_on_a_new_association_is_taken_by_the_listener(tmp_path: Path) -> None:
    outgoing = tmp_path / "outgoing"
    case = make_case(outgoing, "pacs", files=3)
    port = free_port()
    with commitment_scp("new", reply_to=("127.0.0.1", port, OUR_AET), unknown_first=True) as scp:
        with listener_for(port, scp.port, scp.aet, outgoing) as listener:
            result = target(scp.port, scp.aet).send(context(case))
    assert result.extra["storage_commitment"]["committed"] == 3
    assert listener.recorded == [scp.actions[0][0]]
    assert len(listener.ignored) == 1  # the transaction nobody asked about
    assert listener.ignored[0] != scp.actions[0][0]
    assert [r["transaction_uid"] for r in reports(case)] == [scp.actions[0][0]]
    assert reports(case)[0]["via"] == "listener"


def test_listener_refuses_an_answer_addressed_to_another_ae(tmp_path: Path) -> None:
    outgoing = tmp_path / "outgoing"
    case = make_case(outgoing, "pacs", files=1)
    port = free_port()
    with commitment_scp("new", reply_to=("127.0.0.1", port, "SOMEONE")) as scp:
        with listener_for(port, scp.port, scp.aet, outgoing) as listener:
            pacs = target(scp.port, scp.aet, storage_commitment_timeout=2)
            with pytest.raises(NotCommittedError, match="0 of 1 committed"):
                pacs.send(context(case))
    assert scp.report_statuses == [0x0110]
    assert listener.recorded == []
    assert reports(case) == []


def test_orthanc_commits_on_a_new_association(tmp_path: Path) -> None:
    outgoing = tmp_path / "outgoing"
    case = make_case(outgoing, "pacs", files=3)
    port = free_port()
    modalities = {"dispatch": [OUR_AET, "127.0.0.1", port]}
    with Orthanc(tmp_path / "orthanc", modalities=modalities) as orthanc:
        with listener_for(port, orthanc.dicom_port, orthanc.aet, outgoing) as listener:
            result = target(orthanc.dicom_port, orthanc.aet).send(context(case))
    assert result.extra["storage_commitment"]["committed"] == 3
    assert commitment_counts(case)["committed"] == 3
    assert len(listener.recorded) == 1
    [report] = reports(case)
    assert report["via"] == "listener"
    assert sorted(uid for _, uid in report["committed"]) == sorted(uids(case))  # type: ignore[union-attr]


def test_targets_test_says_whether_the_peer_commits(tmp_path: Path) -> None:
    with commitment_scp("same") as scp:
        assert target(scp.port, scp.aet).test_connection()["storage_commitment"] is True
    with parrot_scp() as plain:
        result = target(plain.port, plain.aet).test_connection()
        unused = target(plain.port, plain.aet, storage_commitment="off").test_connection()
    assert result["c-echo"] is True
    assert result["storage_commitment"] is False
    assert DicomTarget.connection_ok(result) is False
    assert "storage_commitment" not in unused
