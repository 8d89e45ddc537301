"""blocks/_stow.py without a peer: batches bounded by count and bytes, the body streamed with its
announced length, the store response judged, no Prefect."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from blocks import _stow
from blocks.dicomweb import DicomWebTarget
from blocks.errors import PermanentTargetError, TransientTargetError
from tests.cases import make_case


def test_batches_are_bounded_by_count_and_bytes() -> None:
    sizes = [_stow.plan_batches(_instances(*[10] * 7), 3, 1000)]
    assert [len(b) for b in sizes[0]] == [3, 3, 1]
    by_bytes = _stow.plan_batches(_instances(40, 40, 40, 500, 10), 50, 100)
    assert [[i.size for i in b] for b in by_bytes] == [[40, 40], [40], [500], [10]]


def test_body_is_streamed_with_the_announced_length(tmp_path: Path) -> None:
    case = make_case(tmp_path, ["t"], files=3, rows=64, cols=64)
    instances = _stow.read_instances(sorted(case.glob("*.dcm")))
    boundary = _stow.new_boundary()
    chunks = list(_stow.iter_body(instances, boundary, chunk_size=4096))
    body = b"".join(chunks)
    assert len(body) == _stow.body_length(instances, boundary)
    assert max(map(len, chunks)) <= 4096 + 200
    header = f'multipart/related; type="application/dicom"; boundary={boundary}'
    assert _stow.content_type(boundary) == header
    from tests.peers.orthanc import _multipart_sop_uids

    assert _multipart_sop_uids(header, body) == [i.sop_instance_uid for i in instances]
    assert body.endswith(f"--{boundary}--\r\n".encode())


def test_store_response_decides_success_and_the_kind_of_failure() -> None:
    batch = _instances(1, 1, 1)
    uids = [i.sop_instance_uid for i in batch]
    ok = {"00081199": {"vr": "SQ", "Value": [{"00081155": {"Value": [u]}} for u in uids]}}
    parsed = _stow.parse_store_response("application/dicom+json", json.dumps(ok).encode())
    assert parsed.missing(batch) == []
    target = DicomWebTarget(url="http://127.0.0.1:9", target_name="web")

    def check(response: dict[str, Any]) -> None:
        body = json.dumps(response).encode()
        target._check_batch(
            "u", batch, _stow.parse_store_response("application/dicom+json", body), 202, 0, 3
        )

    refs = {"00081199": {"vr": "SQ", "Value": [{"00081155": {"Value": [uids[0]]}}]}}
    failed = [{"00081155": {"Value": [u]}, "00081197": {"Value": [0xC000]}} for u in uids[1:]]
    with pytest.raises(PermanentTargetError, match="only 1 out of 3.*0xC000 cannot understand"):
        check({**refs, "00081198": {"vr": "SQ", "Value": failed}})
    busy = [{"00081155": {"Value": [u]}, "00081197": {"Value": [0xA700]}} for u in uids[1:]]
    with pytest.raises(TransientTargetError, match="out of resources"):
        check({**refs, "00081198": {"vr": "SQ", "Value": busy}})
    with pytest.raises(TransientTargetError, match="2 not referenced"):
        check(refs)
    with pytest.raises(PermanentTargetError, match="no ReferencedSOPSequence"):
        target._check_batch("u", batch, _stow.parse_store_response("text/plain", b""), 200, 0, 3)
    xml = (
        '<NativeDicomModel><DicomAttribute tag="00081199" vr="SQ" keyword="ReferencedSOPSequence">'
        + "".join(
            f'<Item number="1"><DicomAttribute tag="00081155" vr="UI"><Value number="1">{u}'
            "</Value></DicomAttribute></Item>"
            for u in uids
        )
        + "</DicomAttribute></NativeDicomModel>"
    )
    assert _stow.parse_store_response("application/dicom+xml", xml.encode()).referenced == set(uids)


def test_stow_core_does_not_import_prefect() -> None:
    code = "import sys, blocks._stow; sys.exit('prefect' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], timeout=60).returncode == 0


def _instances(*sizes: int) -> list[_stow.Instance]:
    return [_stow.Instance(Path(f"{i}.dcm"), s, "1.2", f"1.2.3.{i}") for i, s in enumerate(sizes)]
