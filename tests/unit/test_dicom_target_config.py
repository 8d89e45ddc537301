"""DicomTarget without a peer: the dcmsend command line, the backend chosen, the peer a case is
sent to."""

from __future__ import annotations

from pathlib import Path

from blocks import _dcmsend
from blocks.base import SendContext
from blocks.dicom import DicomTarget, DicomTLSTarget


def test_command_line_is_mercures_order() -> None:
    command = _dcmsend.dcmsend_command(
        "/usr/bin/dcmsend",
        Path("/cases/c1"),
        "10.0.0.5",
        104,
        "PACS",
        "MERCURE",
        Path("/cases/c1/sent.txt"),
        connect_timeout=10,
        acse_timeout=30,
        dimse_timeout=0.5,
    )
    assert command == [
        "/usr/bin/dcmsend",
        "10.0.0.5",
        "104",
        "+r",
        "+sd",
        "/cases/c1",
        "-aet",
        "MERCURE",
        "-aec",
        "PACS",
        "-nuc",
        "+sp",
        "*.dcm",
        "-to",
        "10",
        "+crf",
        "/cases/c1/sent.txt",
        "-ta",
        "30",
        "-td",
        "1",
    ]


def test_backend_defaults_to_auto_which_picks_dcmsend_where_it_can() -> None:
    plain = DicomTarget(ip="127.0.0.1")
    assert plain.backend == "auto"
    assert plain.retrieve_backend == "auto"
    assert DicomTarget.model_fields["backend"].description.endswith(".")  # type: ignore[union-attr]
    assert plain.send_backend() == "dcmsend"
    assert plain.backends() == {"send": "dcmsend (auto)", "retrieve": "dcmtk (auto)"}
    # What only pynetdicom does: several associations, TLS, C-MOVE bound to one address.
    assert DicomTarget(ip="127.0.0.1", max_associations=4).send_backend() == "pynetdicom"
    assert DicomTLSTarget(ip="127.0.0.1").send_backend() == "pynetdicom"
    bound = DicomTarget(ip="127.0.0.1", retrieve_method="move", move_listen_address="127.0.0.1")
    assert bound.backends()["retrieve"] == "pynetdicom (auto)"
    assert DicomTarget(ip="127.0.0.1", backend="pynetdicom").backends()["send"] == "pynetdicom"


def test_sender_ip_and_aet_passing() -> None:
    from tasks.taskjson import parse_task
    from tests.cases import task_json

    task = parse_task(
        task_json("c1", ["t"], sender_address="10.1.2.3", sender_aet="CT1", receiver_aet="MERCURE")
    )
    target = DicomTarget(
        ip="sender", port="", aet_target="PACS", pass_sender_aet=True, pass_receiver_aet=True
    )
    assert target.peer(SendContext(Path("."), task)) == ("10.1.2.3", 104, "MERCURE", "CT1")
    plain = DicomTarget(ip="pacs.example", port="11112", aet_target="PACS", aet_source="ME")
    assert plain.peer(SendContext(Path("."), task)) == ("pacs.example", 11112, "PACS", "ME")
