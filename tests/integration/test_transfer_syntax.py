"""Transfer-syntax conversion against real DCMTK storescp peers on 127.0.0.1.

Proves, on both backends and over TLS: a JPEG 2000 lossless, a JPEG-LS and a JPEG lossless
instance sent to a receiver that accepts only uncompressed syntaxes arrive decoded, their pixel
data identical to the uncompressed original and every other attribute unchanged; a receiver
that accepts everything gets them unchanged (no needless conversion); ``convert: never`` fails
naming the syntax; a file no decoder reads fails for good, naming it; the source files never
change; the report and the send result say what went over the network; a preferred lossless
syntax is used when accepted. On the dcmsend backend JPEG 2000 needs our second pass (DCMTK has
no decoder).
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.encaps import encapsulate
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian, JPEGLSLossless

from blocks._dcmsend_convert import parse_instances
from blocks.base import SendContext, SendResult, dicom_files
from blocks.dicom import DicomTarget
from blocks.errors import PermanentTargetError
from tasks.taskjson import read_task
from tests.cases import make_case
from tests.compressed import COMPRESSED, Reference, attributes, compress_case, dataset_bytes
from tests.dispatch_env import DispatchEnv
from tests.integration.test_target_tls import PKI, pki, tls_target  # noqa: F401 (fixture)
from tests.peers.dcmtk import StoreSCP, dcmtk_binary

pytestmark = pytest.mark.timeout(120)

UNCOMPRESSED = {str(ExplicitVRLittleEndian), str(ImplicitVRLittleEndian)}
BACKENDS = ["pynetdicom", "dcmsend"]


@pytest.fixture(autouse=True)
def _needs_dcmtk() -> None:
    dcmtk_binary("dcmsend")  # skips locally (fails on CI) without DCMTK


def compressed_case(outgoing: Path, targets: list[str]) -> tuple[Path, dict[str, Reference]]:
    """A case of one uncompressed instance and one per :data:`COMPRESSED` syntax."""
    case = make_case(outgoing, targets, files=1, rows=64, cols=64)
    references = compress_case(case)
    return case, references


def context(case: Path) -> SendContext:
    _, task = read_task(case)
    return SendContext(case, task, case / "sent.txt")


def target(port: int, backend: str, **fields: object) -> DicomTarget:
    return DicomTarget(
        ip="127.0.0.1", port=str(port), aet_target="STORESCP", backend=backend, **fields
    )


def digests(case: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in dicom_files(case)}


def assert_decoded(references: dict[str, Reference], scp: StoreSCP) -> None:
    """Every compressed instance arrived uncompressed, pixel-identical, otherwise unchanged."""
    received = scp.received()
    for uid, reference in references.items():
        assert uid in received, (reference.syntax, scp.log())
        ds = dcmread(received[uid])
        assert str(ds.file_meta.TransferSyntaxUID) in UNCOMPRESSED, reference.syntax
        assert hashlib.sha256(bytes(ds.PixelData)).hexdigest() == reference.pixels
        assert attributes(ds) == reference.attributes, reference.syntax


def assert_reported(case: Path, references: dict[str, Reference], result: SendResult) -> None:
    """sent.txt: each compressed instance with its own syntax and the uncompressed one sent."""
    report = parse_instances((case / "sent.txt").read_text())
    by_uid = {i.sop_instance_uid: i for i in report.instances}
    for uid, reference in references.items():
        assert by_uid[uid].transfer_syntax == reference.syntax
        assert by_uid[uid].network_transfer_syntax in UNCOMPRESSED
        assert by_uid[uid].status == 0
    converted = {k: n for k, n in result.extra["transfer_syntaxes"].items() if " -> " in k}
    assert sum(converted.values()) == len(COMPRESSED), result.extra
    assert " -> " in result.detail


@pytest.mark.parametrize("backend", BACKENDS)
def test_refused_syntaxes_arrive_decoded(tmp_path: Path, backend: str) -> None:
    case, references = compressed_case(tmp_path / "outgoing", ["pacs"])
    before = digests(case)
    with StoreSCP(tmp_path / "pacs") as scp:  # storescp's default: uncompressed syntaxes only
        result = target(scp.port, backend).send(context(case))
        assert_decoded(references, scp)
        assert len(scp.received()) == len(COMPRESSED) + 1
    assert result.files == len(COMPRESSED) + 1
    assert digests(case) == before  # the source files never change
    assert_reported(case, references, result)
    assert not list(case.glob("*.tmp"))


@pytest.mark.parametrize("backend", BACKENDS)
def test_accepting_receiver_gets_the_files_unchanged(tmp_path: Path, backend: str) -> None:
    case, references = compressed_case(tmp_path / "outgoing", ["pacs"])
    sources = {dcmread(p, stop_before_pixels=True).SOPInstanceUID: p for p in dicom_files(case)}
    with StoreSCP(tmp_path / "pacs", extra_args=["+xa"]) as scp:  # accepts every syntax
        result = target(scp.port, backend).send(context(case))
        received = scp.received()
        for uid, reference in references.items():
            ds = dcmread(received[uid], stop_before_pixels=True)
            assert str(ds.file_meta.TransferSyntaxUID) == reference.syntax
            assert dataset_bytes(received[uid]) == dataset_bytes(sources[uid])
    assert not any(" -> " in k for k in result.extra["transfer_syntaxes"]), result.extra


@pytest.mark.parametrize("backend", BACKENDS)
def test_convert_never_fails_naming_the_syntax(tmp_path: Path, backend: str) -> None:
    case, _ = compressed_case(tmp_path / "outgoing", ["pacs"])
    with StoreSCP(tmp_path / "pacs") as scp:
        with pytest.raises(PermanentTargetError) as caught:
            target(scp.port, backend, convert="never").send(context(case))
        assert len(scp.received()) == 1  # the uncompressed instance only
    message = str(caught.value)
    assert "no accepted presentation context for CT Image Storage in " in message
    assert "(convert: never)" in message
    assert any(
        name in message
        for name in ("JPEG 2000", "JPEG-LS Lossless", "JPEG Lossless, Non-Hierarchical")
    ), message
    assert "\n" not in message


def test_refused_syntaxes_arrive_decoded_over_tls(
    env: DispatchEnv,
    pki: PKI,  # noqa: F811
    tmp_path: Path,
) -> None:
    with StoreSCP(tmp_path / "pacs", tls=pki.scp()) as scp:
        env.save_target(tls_target(pki, scp.port), "PACS_TLS")
        case, references = compressed_case(env.outgoing, ["PACS_TLS"])

        outcome = env.dispatch(case)

        assert outcome["location"] == "success", outcome
        assert_decoded(references, scp)
    sent = outcome["targets"]["PACS_TLS"]
    # What the case's artifact shows per target: the syntaxes that went over the network.
    assert sum(n for k, n in sent["extra"]["transfer_syntaxes"].items() if " -> " in k) == 3, sent
    assert " -> Explicit VR Little Endian" in sent["detail"]


def test_preferred_syntax_is_used_when_accepted(tmp_path: Path) -> None:
    case = make_case(tmp_path / "outgoing", ["pacs"], files=2, rows=64, cols=64)
    originals = {
        str(ds.SOPInstanceUID): hashlib.sha256(bytes(ds.PixelData)).hexdigest()
        for ds in (dcmread(p) for p in dicom_files(case))
    }
    remote = target(0, "auto", preferred_transfer_syntax="JPEGLSLossless")
    assert remote.preferred_transfer_syntax == JPEGLSLossless
    assert remote.send_backend() == "pynetdicom"  # dcmsend cannot encode
    for accept_all, expected in ((True, {str(JPEGLSLossless)}), (False, UNCOMPRESSED)):
        folder = tmp_path / f"pacs-{accept_all}"
        with StoreSCP(folder, extra_args=["+xa"] if accept_all else []) as scp:
            remote.port = str(scp.port)
            remote.send(context(case))
            for uid, path in scp.received().items():
                ds = dcmread(path)
                assert str(ds.file_meta.TransferSyntaxUID) in expected
                if accept_all:
                    ds.decompress(decoding_plugin="gdcm", generate_instance_uid=False)
                assert hashlib.sha256(bytes(ds.PixelData)).hexdigest() == originals[uid]
            assert set(scp.received()) == set(originals)


def test_preferred_syntax_must_be_a_lossless_one_we_encode() -> None:
    with pytest.raises(ValueError, match="JPEGLSLossless"):
        DicomTarget(ip="127.0.0.1", preferred_transfer_syntax="1.2.840.10008.1.2.4.50")
    assert (
        DicomTarget(ip="127.0.0.1", preferred_transfer_syntax="").preferred_transfer_syntax is None
    )


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_file_no_decoder_reads_fails_for_good_naming_it(tmp_path: Path, backend: str) -> None:
    case, references = compressed_case(tmp_path / "outgoing", ["pacs"])
    j2k = next(
        p for p in dicom_files(case) if dcmread(p).file_meta.TransferSyntaxUID == COMPRESSED[0]
    )
    broken = dcmread(j2k)
    broken.PixelData = encapsulate([b"\xff\x4f\xff\x51 not a JPEG 2000 codestream"])
    broken.save_as(case / "zz-broken.dcm", enforce_file_format=True)
    j2k.unlink()
    with StoreSCP(tmp_path / "pacs") as scp:
        with pytest.raises(PermanentTargetError) as caught:
            target(scp.port, backend).send(context(case))
    message = str(caught.value)
    assert "cannot decode zz-broken.dcm (JPEG 2000 Image Compression (Lossless Only))" in message
    assert "\n" not in message
