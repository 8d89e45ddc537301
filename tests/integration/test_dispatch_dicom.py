"""dispatch_case to real DICOM peers: DCMTK storescp, and a scriptable pynetdicom SCP."""

from __future__ import annotations

from pathlib import Path

from blocks._dcmsend_report import parse_report
from blocks.dicom import DicomTarget
from blocks.folder import FolderTarget
from tests.cases import make_case
from tests.dicomfiles import pixel_digests
from tests.dispatch_env import DispatchEnv
from tests.peers.dcmtk import StoreSCP
from tests.peers.net import free_port
from tests.peers.pynetdicom_scp import DROP, parrot_scp


def dicom_target(port: int, aet: str = "STORESCP", **fields: object) -> DicomTarget:
    """A target on the pynetdicom path (dcmsend's own tests: test_dcmsend_backend.py)."""
    fields.setdefault("backend", "pynetdicom")
    return DicomTarget(ip="127.0.0.1", port=str(port), aet_target=aet, **fields)


def test_case_arrives_at_storescp_byte_identical(env: DispatchEnv, tmp_path: Path) -> None:
    with StoreSCP(tmp_path / "pacs") as scp:
        env.save_target(dicom_target(scp.port), "PACS_Main")
        case = make_case(env.outgoing, ["PACS_Main"], files=7, rows=64, cols=64)
        env.dispatch_delivered(case, "PACS_Main", scp.received, instances=7)


def test_two_dicom_targets_and_a_folder_get_separate_reports(
    env: DispatchEnv, tmp_path: Path
) -> None:
    with StoreSCP(tmp_path / "a") as a, StoreSCP(tmp_path / "b") as b:
        env.save_target(dicom_target(a.port), "pacs_a")
        env.save_target(dicom_target(b.port), "pacs_b")
        env.save_target(FolderTarget(folder=str(tmp_path / "share")), "share")
        case = make_case(env.outgoing, ["pacs_a", "pacs_b", "share"], files=3)
        uids = set(pixel_digests(case))

        assert env.dispatch(case)["location"] == "success"
        assert set(a.received()) == uids
        assert set(b.received()) == uids
    done = env.success / case.name
    assert not (done / "sent.txt").exists()
    for name in ("pacs_a", "pacs_b"):
        assert parse_report((done / f"sent.{name}.txt").read_text())["summary"]["successful"] == 3


def test_rejected_association_is_retried_later(env: DispatchEnv, tmp_path: Path) -> None:
    with StoreSCP(tmp_path / "pacs", refuse=True) as scp:
        task = env.dispatch_rejected(dicom_target(scp.port), "pacs")
    status = task["dispatch"]["status"]["pacs"]
    assert status["state"] == "error"
    assert "reject" in status["message"].lower()


def test_peer_down_fails_quickly_and_keeps_the_case(env: DispatchEnv) -> None:
    env.save_settings(retry_max=2, retry_delay=0.0)
    env.save_target(dicom_target(free_port(), connect_timeout=2), "down")
    case = make_case(env.outgoing, ["down"])
    assert env.dispatch(case)["location"] == "outgoing"
    assert env.dispatch(case)["location"] == "error"
    failed = env.error / case.name
    assert len(list(failed.glob("*.dcm"))) == 3, "nothing is lost"
    assert "down" in env.task(failed)["info"]["fail_reason"]


def test_sop_class_not_accepted_is_a_target_error(env: DispatchEnv, tmp_path: Path) -> None:
    env.save_settings(retry_max=1)
    with StoreSCP(tmp_path / "mr-only", accept_only=["MRImageStorage"]) as scp:
        env.save_target(dicom_target(scp.port), "mr_only")
        case = make_case(env.outgoing, ["mr_only"])
        assert env.dispatch(case)["location"] == "error"
        assert scp.received() == {}
    report = parse_report((env.error / case.name / "sent.txt").read_text())
    assert report["summary"].get("successful", 0) == 0


def test_lost_response_is_retried_never_counted_as_sent(env: DispatchEnv) -> None:
    """pynetdicom 3.0.4 loses a C-STORE response now and then: the instance must be re-sent."""

    def script(uid: str, number: int) -> int | str:
        return DROP if number == 1 else 0x0000

    with parrot_scp(script, drop_hold=2.0) as scp:
        env.save_target(dicom_target(scp.port, scp.aet, dimse_timeout=1), "flaky")
        case = make_case(env.outgoing, ["flaky"], files=3)
        uids = set(pixel_digests(case))
        result = env.dispatch(case)
        arrivals = list(scp.received)
    assert result["location"] == "success", result
    dropped = arrivals[0]
    assert dropped.action == DROP
    answered = {r.sop_instance_uid for r in arrivals if r.action == 0x0000}
    assert answered == uids, "every instance, the dropped one included, must be acknowledged"


def test_warning_status_counts_as_sent_unless_configured(env: DispatchEnv) -> None:
    env.save_settings(retry_max=1)
    with parrot_scp(lambda uid, n: 0xB000) as scp:
        env.save_target(dicom_target(scp.port, scp.aet), "coercing")
        ok = make_case(env.outgoing, ["coercing"])
        assert env.dispatch(ok)["location"] == "success"
        env.save_target(dicom_target(scp.port, scp.aet, warning_counts_as_sent=False), "coercing")
        strict = make_case(env.outgoing, ["coercing"])
        assert env.dispatch(strict)["location"] == "error"


def test_connection_test_keys(tmp_path: Path) -> None:
    with StoreSCP(tmp_path / "pacs") as scp:
        up = dicom_target(scp.port).test_connection()
    assert up == {"ping": True, "c-echo": True, "loopback_mode": False}
    down = dicom_target(free_port()).test_connection()
    assert down["c-echo"] is False
    assert not DicomTarget.connection_ok(down)
    assert DicomTarget(ip="sender").test_connection()["loopback_mode"] is True
