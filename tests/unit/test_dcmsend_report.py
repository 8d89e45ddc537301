"""dcmsend report format and mercure's parser, plus the pure parts of blocks._dimse.

The byte-for-byte comparison with the real dcmsend lives in tests/integration/test_dimse.py;
these pin the layout and the status tables (taken from dcmsend 3.6.7 runs) without any peer.
"""

from __future__ import annotations

import queue
import threading
from pathlib import Path
from types import SimpleNamespace

import pytest
from pydicom.uid import (
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEGBaseline8Bit,
    RLELossless,
)

from blocks import _dimse
from blocks._dcmsend_report import (
    dcmtk_status_text,
    dcmtk_summary_bucket,
    format_report,
    parse_report,
    write_report,
)
from blocks._dimse import InstanceResult, status_category
from blocks._transcode import Conversion

from .store_results import EXPLICIT, instance_result
from .store_results import store_result as result

# The example of mercure-dispatcher.md §5.1 (DCMTK dcmsend 3.6.7), one instance shown in full.
SPEC_REPORT = """\
Detailed Report on the Transfer of Instances
============================================

Communication Peer : 127.0.0.1:11199
AE Titles used     : DCMSEND -> ANY
Current Date/Time  : 2026-11-23 08:10:23


Number        : 1
Filename      : case/one.dcm
SOP Instance  : 1.2.3.4.5.6.7.1
SOP Class     : 1.2.840.10008.5.1.4.1.1.2 = CTImageStorage
Original Xfer : 1.2.840.10008.1.2.1 = Little Endian Explicit
Dataset Size  : 144 bytes
Association   : 1
Pres. Context : 1
Network Xfer  : 1.2.840.10008.1.2.1 = Little Endian Explicit
DIMSE Status  : 0x0000 (Success)

Number        : 2
Filename      : case/two.dcm
SOP Instance  : 1.2.3.4.5.6.7.2
SOP Class     : 1.2.840.10008.5.1.4.1.1.2 = CTImageStorage
Original Xfer : 1.2.840.10008.1.2.1 = Little Endian Explicit
Dataset Size  : 144 bytes
Association   : 1
Pres. Context : 1
Network Xfer  : 1.2.840.10008.1.2.1 = Little Endian Explicit
DIMSE Status  : 0x0000 (Success)


Status Summary
--------------
Number of associations   : 1
Number of pres. contexts : 1
Number of SOP instances  : 2
- sent to the peer       : 2
  * with status SUCCESS  : 2"""


def instance(
    name: str,
    status: int | None = 0x0000,
    *,
    sop: str = "1.2.3.4.5.6.7.1",
    no_context: bool = False,
    sent: bool = True,
) -> InstanceResult:
    return instance_result(
        Path("case") / name,
        status,
        sop_instance_uid=sop,
        size=144,
        context_id=None if no_context else 1,
        network_transfer_syntax=None if no_context else EXPLICIT,
        error=None if status is not None else "why",
        no_context=no_context,
        request_sent=sent and not no_context,
    )


def test_format_report_matches_dcmsend_layout() -> None:
    res = result(
        instance("one.dcm", sop="1.2.3.4.5.6.7.1"), instance("two.dcm", sop="1.2.3.4.5.6.7.2")
    )
    assert format_report(res) == SPEC_REPORT


# (status, DIMSE Status text, summary line) as printed by dcmsend 3.6.7 for a pynetdicom SCP
# answering that status (tests/integration also re-checks a mix against the real binary).
DCMSEND_367 = [
    (0x0000, "Success", "SUCCESS"),
    (0xB000, "Warning: CoercionOfDataElements", "WARNING"),
    (0xB006, "Warning: ElementsDiscarded", "WARNING"),
    (0xB007, "Warning: DataSetDoesNotMatchSOPClass", "WARNING"),
    (0xB123, "Unknown Status: 0xb123", "WARNING"),
    (0xA700, "Refused: OutOfResources", "REFUSED"),
    (0xA7FF, "Refused: OutOfResources", "REFUSED"),
    (0xA800, "Unknown Status: 0xa800", "unknown"),
    (0xA900, "Error: DataSetDoesNotMatchSOPClass", "ERROR"),
    (0xC000, "Error: CannotUnderstand", "ERROR"),
    (0xC123, "Error: CannotUnderstand", "ERROR"),
    (0x0122, "Refused: SOPClassNotSupported", "REFUSED"),
    (0x0107, "Unknown Status: 0x107", "WARNING"),
    (0x0116, "Unknown Status: 0x116", "WARNING"),
    (0x0001, "Unknown Status: 0x1", "WARNING"),
    (0x0211, "Unknown Status: 0x211", "unknown"),
    (0xFE00, "Unknown Status: 0xfe00", "unknown"),
    (0xFF00, "Unknown Status: 0xff00", "unknown"),
    (0xD000, "Unknown Status: 0xd000", "unknown"),
]


@pytest.mark.parametrize(("code", "text", "bucket"), DCMSEND_367)
def test_status_text_and_bucket_follow_dcmtk_367(code: int, text: str, bucket: str) -> None:
    assert dcmtk_status_text(code) == text
    assert dcmtk_summary_bucket(code) == bucket


def test_summary_lists_only_nonzero_counts_and_not_sent() -> None:
    res = result(
        instance("a.dcm", 0x0000),
        instance("b.dcm", 0xB000),
        instance("c.dcm", 0xA700),
        instance("d.dcm", 0xC000),
        instance("e.dcm", 0xA800),
        instance("f.dcm", None),  # sent, response lost
        instance("g.dcm", None, no_context=True),
    )
    text = format_report(res)
    summary = text.split("Status Summary\n--------------\n")[1].splitlines()
    assert summary == [
        "Number of associations   : 1",
        "Number of pres. contexts : 1",
        "Number of SOP instances  : 7",
        "- sent to the peer       : 5",
        "  * with status SUCCESS  : 1",
        "  * with status WARNING  : 1",
        "  * with status ERROR    : 1",
        "  * with status REFUSED  : 1",
        "  * with unknown status  : 1",
        "- NOT sent to the peer   : 2",
        "  * no acceptable pres.  : 1",
    ]
    assert "DIMSE Status  : 0xb000 (Warning: CoercionOfDataElements)" in text
    assert "DIMSE Status  : <not sent>" in text
    assert "DIMSE Status  : <no acceptable presentation context>" in text
    assert "Pres. Context : 0\nNetwork Xfer  : \nDIMSE Status  : <no acceptable" in text
    parsed = parse_report(text)["summary"]
    assert parsed == {"sop_instances": 7, "sent_to_peer": 5, "successful": 1, "error": 1}


def test_sop_class_and_xfer_names_are_dcmtk_names() -> None:
    inst = InstanceResult(
        path=Path("x.dcm"),
        sop_class_uid="1.2.840.10008.5.1.4.1.1.7.4",
        sop_instance_uid="1.2.3",
        transfer_syntax=str(JPEGBaseline8Bit),
        size=10,
        status=0,
        association=1,
        context_id=3,
        network_transfer_syntax=str(JPEGBaseline8Bit),
        error=None,
        request_sent=True,
    )
    text = format_report(result(inst))
    assert (
        "SOP Class     : 1.2.840.10008.5.1.4.1.1.7.4 = "
        "MultiframeTrueColorSecondaryCaptureImageStorage"
    ) in text
    assert "Original Xfer : 1.2.840.10008.1.2.4.50 = JPEG Baseline\n" in text
    assert "Pres. Context : 3\n" in text


def test_parse_report_reproduces_mercure_example() -> None:
    assert parse_report(SPEC_REPORT) == {
        "summary": {"sop_instances": 2, "sent_to_peer": 2, "successful": 2},
        "header": {
            "communication_peer": "127.0.0.1",
            "ae_titles_used": "DCMSEND -> ANY",
            "current_datetime": "2026-11-23 08:10:23",
        },
    }


def test_parse_report_quirks_indentation_and_crlf() -> None:
    # mercure's own fake report indents "- sent to the peer": not parsed, as in mercure.
    fake = SPEC_REPORT.replace("- sent to the peer", "  - sent to the peer")
    assert "sent_to_peer" not in parse_report(fake)["summary"]
    assert parse_report(SPEC_REPORT.replace("\n", "\r\n")) == parse_report(SPEC_REPORT)
    # Header lines beyond the first 8 are not looked at.
    late = "\n\n\n" + SPEC_REPORT  # date line moves from line 6 to line 9
    assert "current_datetime" not in parse_report(late)["header"]


def test_parse_report_without_summary_fails_like_mercure() -> None:
    with pytest.raises(ValueError, match=r"^Failed to parse dcmsend result\.$"):
        parse_report(SPEC_REPORT.split("Status Summary")[0])


def test_write_report_is_atomic_and_overwrites(tmp_path: Path) -> None:
    target = tmp_path / "sent.txt"
    target.write_text("old")
    res = result(instance("one.dcm"))
    assert write_report(target, res) == target
    assert target.read_text() == format_report(res)
    assert [p.name for p in tmp_path.iterdir()] == ["sent.txt"]
    assert target.stat().st_mode & 0o777 == 0o644


def test_status_category_and_accepted() -> None:
    assert status_category(None) == "none"
    assert status_category(0x0000) == "success"
    assert status_category(0xB000) == "warning"
    assert status_category(0xA700) == "failure"
    assert status_category(0xC000) == "failure"
    assert status_category(0xFF00) == "failure"  # pending is not stored
    warned = result(instance("a.dcm"), instance("b.dcm", 0xB007))
    assert warned.accepted()
    assert not warned.accepted(warnings_ok=False)
    assert [i.path.name for i in warned.failed(warnings_ok=False)] == ["b.dcm"]
    lost = result(instance("a.dcm"), instance("b.dcm", None))
    assert not lost.accepted()
    assert lost.counts() == {"success": 1, "warning": 0, "failure": 0, "none": 1}


def test_status_text() -> None:
    assert _dimse.status_text(None) == "no response"
    assert _dimse.status_text(0xA700) == "0xA700 (failure)"
    assert _dimse.status_text(0xB000) == "0xB000 (warning)"


def test_proposed_contexts_and_context_batches() -> None:
    jpeg, implicit = str(JPEGBaseline8Bit), str(ImplicitVRLittleEndian)
    plain = Conversion()
    assert plain.proposals(EXPLICIT) == [(EXPLICIT, implicit)]
    assert plain.proposals(implicit) == [(implicit, str(ExplicitVRLittleEndian))]
    # A compressed file: its own syntax, and the uncompressed ones on a context of their own.
    assert plain.proposals(jpeg) == [(jpeg,), (EXPLICIT, implicit)]
    assert Conversion(convert=False).proposals(jpeg) == [(jpeg,)]
    rle = str(RLELossless)
    assert Conversion(preferred=rle).proposals(EXPLICIT) == [(rle,), (EXPLICIT, implicit)]
    assert Conversion(preferred=rle).proposals(jpeg) == [(jpeg,), (EXPLICIT, implicit)]
    infos = [
        _dimse._FileInfo(i, Path(f"{i}.dcm"), f"1.2.3.{i % 130}", "1.2.3", EXPLICIT, 1)
        for i in range(300)
    ]
    batch, keys = _dimse._context_batch(infos)
    assert len(keys) == _dimse.MAX_CONTEXTS == 128
    assert {k for i in batch for k in i.keys(plain)} == set(keys)
    rest = [i for i in infos if i not in batch]
    assert {i.sop_class_uid for i in rest} == {"1.2.3.128", "1.2.3.129"}
    # Two contexts per compressed file: 64 SOP classes fill an association.
    compressed = [
        _dimse._FileInfo(i, Path(f"{i}.dcm"), f"1.2.3.{i}", "1.2.3", jpeg, 1) for i in range(70)
    ]
    batch, keys = _dimse._context_batch(compressed)
    assert len(batch) == 64
    assert len(keys) == 128


class _Checkpointed:
    """Just enough of a DIMSEServiceProvider for the patched get_msg."""

    def __init__(self) -> None:
        self.assoc = SimpleNamespace(_reactor_checkpoint=threading.Event())
        self.assoc._reactor_checkpoint.set()
        self.msg_queue: queue.Queue[tuple[int | None, object]] = queue.Queue()
        self.dimse_timeout = 0.1


def test_reactor_race_fix_is_applied_and_idempotent() -> None:
    from pynetdicom.dimse import DIMSEServiceProvider

    assert _dimse.REACTOR_RACE_FIXED
    before = DIMSEServiceProvider.get_msg
    assert _dimse._patch_reactor_race() is True
    assert DIMSEServiceProvider.get_msg is before
    assert getattr(before, _dimse._PATCH_MARK)


def test_reactor_get_msg_leaves_responses_to_a_paused_sender() -> None:
    from pynetdicom.dimse import DIMSEServiceProvider

    get_msg = DIMSEServiceProvider.get_msg
    dimse = _Checkpointed()
    dimse.msg_queue.put((1, "rsp-1"))
    # Reactor running normally: it gets the message.
    assert get_msg(dimse, block=False) == (1, "rsp-1")  # type: ignore[arg-type,comparison-overlap,unused-ignore]
    # A send_*() cleared the checkpoint: the non-blocking reactor call must not take it ...
    dimse.msg_queue.put((1, "rsp-2"))
    dimse.assoc._reactor_checkpoint.clear()
    assert get_msg(dimse, block=False) == (None, None)  # type: ignore[arg-type,comparison-overlap,unused-ignore]
    # ... while the sender's blocking call does.
    assert get_msg(dimse, block=True) == (1, "rsp-2")  # type: ignore[arg-type,comparison-overlap,unused-ignore]


def test_reactor_get_msg_puts_back_a_message_taken_inside_the_window() -> None:
    from pynetdicom.dimse import DIMSEServiceProvider

    get_msg = DIMSEServiceProvider.get_msg
    dimse = _Checkpointed()
    checkpoint = dimse.assoc._reactor_checkpoint

    class ClearingQueue(queue.Queue[tuple[int | None, object]]):
        """The sender clears the checkpoint right while the reactor takes the message."""

        def get(
            self, block: bool = True, timeout: float | None = None
        ) -> tuple[int | None, object]:
            item = super().get(block, timeout)
            if not block:
                checkpoint.clear()
            return item

    dimse.msg_queue = ClearingQueue()
    dimse.msg_queue.put((3, "first"))
    dimse.msg_queue.put((3, "second"))
    assert get_msg(dimse, block=False) == (None, None)  # type: ignore[arg-type,comparison-overlap,unused-ignore]
    # Put back at the head, in order, for the blocked sender.
    assert get_msg(dimse, block=True) == (3, "first")  # type: ignore[arg-type,comparison-overlap,unused-ignore]
    assert get_msg(dimse, block=True) == (3, "second")  # type: ignore[arg-type,comparison-overlap,unused-ignore]
