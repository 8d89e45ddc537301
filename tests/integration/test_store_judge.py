"""Both DICOM backends judge a failed C-STORE alike (``blocks._dimse_results``), against a real
Storage SCP on 127.0.0.1 that answers each instance with a scripted status.

A case where one instance got 0xA700 (out of resources) and another 0xA900 (data set does not
match SOP class) cannot be stored by a quick retry: both backends call it permanent. Only out of
resources is transient.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from blocks.base import SendContext, dicom_files
from blocks.dicom import DicomTarget
from blocks.errors import PermanentTargetError, TransientTargetError
from tasks.taskjson import read_task
from tests.cases import make_case
from tests.dicomfiles import pixel_digest
from tests.peers.dcmtk import dcmtk_binary
from tests.peers.pynetdicom_scp import parrot_scp

pytestmark = pytest.mark.timeout(120)

BACKENDS = ["pynetdicom", "dcmsend"]


def send(case: Path, port: int, aet: str, backend: str) -> None:
    if backend == "dcmsend":
        dcmtk_binary("dcmsend")  # skips locally (fails on CI) without DCMTK
    target = DicomTarget(ip="127.0.0.1", port=str(port), aet_target=aet, backend=backend)
    _, task = read_task(case)
    target.send(SendContext(case, task, case / "sent.txt"))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    ("codes", "error"),
    [
        ((0xA700, 0xA900), PermanentTargetError),
        ((0xA900, 0xA700), PermanentTargetError),
        ((0xA700, 0xA701), TransientTargetError),
        ((0xC000, 0xC000), PermanentTargetError),
    ],
)
def test_a_send_is_transient_only_when_every_failure_is(
    tmp_path: Path, backend: str, codes: tuple[int, int], error: type[Exception]
) -> None:
    case = make_case(tmp_path / "outgoing", ["pacs"], files=3)
    files = dicom_files(case)
    script = {pixel_digest(f)[0]: code for f, code in zip(files[1:], codes, strict=True)}
    with parrot_scp(script) as scp:
        with pytest.raises(error) as caught:
            send(case, scp.port, scp.aet, backend)
        # Each instance went once and got its scripted answer: the judgement is on these.
        assert sorted(int(r.action) for r in scp.received) == sorted([0x0000, *codes])
    assert "only 1 out of 3 instances were sent successfully" in str(caught.value)
