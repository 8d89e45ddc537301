"""Decoding, encoding and reporting of transfer-syntax conversion, without a network.

Proves: a decoded file keeps its pixel values (compared with the uncompressed original), its
SOP Instance UID and every other attribute; the decoded size is checked before decoding; a file
no decoder reads fails naming the file and its syntax; a dcmsend report survives being parsed
and written again, and the second pass's instances replace the refused ones in it.
"""

from __future__ import annotations

import io
from dataclasses import replace
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.encaps import encapsulate
from pydicom.uid import (
    MPEG2MPML,
    UID,
    ExplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGLSLossless,
    RLELossless,
    generate_uid,
)

from blocks import _transcode
from blocks._dcmsend_convert import _merge, parse_instances, refusal_error
from blocks._dcmsend_report import format_report
from blocks._dimse_results import InstanceResult
from blocks._transcode import Conversion, ConversionError
from tests.compressed import attributes
from tests.dicomfiles import make_ct_instance

from .store_results import instance_result, store_result


def original(tmp_path: Path) -> Path:
    return make_ct_instance(
        tmp_path / "raw.dcm",
        study_uid=generate_uid(),
        series_uid=generate_uid(),
        sop_uid=generate_uid(),
        rows=32,
        cols=32,
        seed=3,
    )


def encoded(path: Path, syntax: str) -> bytes:
    ds = dcmread(path)
    plugin = {RLELossless: "pydicom", JPEG2000Lossless: "pylibjpeg", JPEGLSLossless: "pyjpegls"}
    ds.compress(syntax, encoding_plugin=plugin[syntax], generate_instance_uid=False)
    out = io.BytesIO()
    ds.save_as(out, enforce_file_format=True)
    return out.getvalue()


@pytest.mark.parametrize("syntax", [JPEG2000Lossless, JPEGLSLossless, RLELossless])
def test_decode_keeps_pixels_uid_and_attributes(tmp_path: Path, syntax: str) -> None:
    raw = dcmread(original(tmp_path))
    source = encoded(tmp_path / "raw.dcm", syntax)
    before = attributes(dcmread(io.BytesIO(source)))

    ds = _transcode.decode(io.BytesIO(source), "x.dcm", syntax)

    assert ds.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
    assert bytes(ds.PixelData) == bytes(raw.PixelData)
    assert ds.SOPInstanceUID == raw.SOPInstanceUID
    assert attributes(ds) == before


def test_decoded_size_is_checked_before_decoding(tmp_path: Path) -> None:
    source = dcmread(io.BytesIO(encoded(original(tmp_path), JPEG2000Lossless)))
    source.Rows = source.Columns = 60000  # the header lies: 60000² × 2 bytes ≈ 7 GB
    source.NumberOfFrames = 1
    out = io.BytesIO()
    source.save_as(out, enforce_file_format=True)
    with pytest.raises(ConversionError) as caught:
        _transcode.decode(io.BytesIO(out.getvalue()), "huge.dcm", JPEG2000Lossless)
    message = str(caught.value)
    assert "huge.dcm" in message
    assert "JPEG 2000" in message
    assert "7200000000 bytes, over the limit of 2147483648 bytes" in message
    with pytest.raises(ConversionError, match="over the limit of 100 bytes"):
        _transcode.decode(
            io.BytesIO(encoded(tmp_path / "raw.dcm", RLELossless)), "a", RLELossless, 100
        )


def test_a_file_no_decoder_reads_is_named_with_its_syntax(tmp_path: Path) -> None:
    with pytest.raises(ConversionError, match=r"clip\.dcm: no decoder for MPEG2"):
        _transcode.decode(io.BytesIO(b""), "clip.dcm", MPEG2MPML)
    corrupt = dcmread(io.BytesIO(encoded(original(tmp_path), JPEG2000Lossless)))
    corrupt.PixelData = encapsulate([b"\xff\x4f\xff\x51 not a codestream"])
    out = io.BytesIO()
    corrupt.save_as(out, enforce_file_format=True)
    with pytest.raises(ConversionError) as caught:
        _transcode.decode(io.BytesIO(out.getvalue()), "bad.dcm", JPEG2000Lossless)
    assert str(caught.value).startswith("cannot decode bad.dcm (JPEG 2000 Image Compression")


def test_encode_in_the_preferred_syntax_is_lossless(tmp_path: Path) -> None:
    path = original(tmp_path)
    with path.open("rb") as fh:
        ds = _transcode.encode(fh, path.name, ExplicitVRLittleEndian, JPEGLSLossless)
    assert ds.file_meta.TransferSyntaxUID == JPEGLSLossless
    ds.decompress(decoding_plugin="pyjpegls", generate_instance_uid=False)
    assert bytes(ds.PixelData) == bytes(dcmread(path).PixelData)


def test_preferred_syntax_names() -> None:
    assert _transcode.preferred_syntax("JPEGLSLossless") == JPEGLSLossless
    assert _transcode.preferred_syntax(str(RLELossless)) == RLELossless
    assert _transcode.preferred_syntax("  ") is None
    with pytest.raises(ValueError, match="JPEG2000Lossless"):
        _transcode.preferred_syntax("JPEGBaseline8Bit")  # lossy: never chosen for a site


def instance(
    name: str, syntax: str, network: str | None, status: int | None, **kw: object
) -> InstanceResult:
    fields: dict[str, object] = {
        "sop_instance_uid": f"1.2.3.{len(name)}",
        "transfer_syntax": syntax,
        "size": 2048,
        "context_id": 1 if network else None,
        "network_transfer_syntax": network,
        "request_sent": status is not None,
    }
    return instance_result(Path("/cases/c1") / name, status, **{**fields, **kw})


EXPLICIT = str(ExplicitVRLittleEndian)
J2K = str(JPEG2000Lossless)


def test_a_dcmsend_report_is_parsed_back_to_the_same_text() -> None:
    text = format_report(
        store_result(
            instance("a.dcm", EXPLICIT, EXPLICIT, 0x0000),
            instance("b.dcm", J2K, J2K, None, no_context=True, error="x"),
            instance("c.dcm", str(JPEGLSLossless), EXPLICIT, 0xB000),
            instance("d.dcm", EXPLICIT, EXPLICIT, None, error="<not sent>"),
            contexts=3,
        )
    )
    assert format_report(parse_instances(text)) == text


def test_second_pass_replaces_the_refused_instances() -> None:
    first = store_result(
        instance("a.dcm", EXPLICIT, EXPLICIT, 0x0000),
        instance("b.dcm", J2K, J2K, None, no_context=True, error="x"),
        contexts=3,
    )
    second = replace(
        store_result(instance("b.dcm", EXPLICIT, EXPLICIT, 0x0000, size=4096), contexts=3),
        associations=1,
    )
    merged = _merge(first, second)
    assert [i.status for i in merged.instances] == [0, 0]
    b = merged.instances[1]
    assert (b.transfer_syntax, b.network_transfer_syntax, b.association) == (J2K, EXPLICIT, 2)
    assert merged.associations == 2
    assert _transcode.sent_as(merged.instances) == {
        "Explicit VR Little Endian": 1,
        "JPEG 2000 Image Compression (Lossless Only) -> Explicit VR Little Endian": 1,
    }
    report = format_report(merged).encode()
    assert refusal_error(report, Conversion(), "t") is None


def test_refusal_names_the_file_and_syntax() -> None:
    refused = format_report(
        store_result(
            instance("a.dcm", EXPLICIT, EXPLICIT, 0x0000),
            instance("b.dcm", J2K, J2K, None, error="<not sent>"),
            contexts=3,
        )
    ).encode()
    never = Conversion(convert=False)
    assert refusal_error(refused, never, "t") is None  # <not sent> alone: maybe a lost link
    error = refusal_error(refused, never, "t", "E: ... 0006:0101 ASC Bad presentation context ID")
    assert error is not None
    assert str(error) == (
        "t: 1 of 2 instances refused: b.dcm: no accepted presentation context for CT Image "
        "Storage in JPEG 2000 Image Compression (Lossless Only) (convert: never)"
    )
    mpeg = format_report(
        store_result(
            instance("m.dcm", str(MPEG2MPML), None, None, no_context=True, error="x"), contexts=3
        )
    ).encode()
    error = refusal_error(mpeg, Conversion(), "t")
    assert error is not None
    assert str(error).endswith(f"in {UID(MPEG2MPML).name} (no decoder for it here)")


def test_proposals_without_a_decoder_offer_only_the_own_syntax() -> None:
    assert Conversion().proposals(str(MPEG2MPML)) == [(str(MPEG2MPML),)]
    empty = Dataset()
    empty.Rows, empty.Columns, empty.BitsAllocated = 4, 5, 16
    empty.SamplesPerPixel, empty.NumberOfFrames = 3, 2
    assert _transcode.decoded_size(empty) == 4 * 5 * 2 * 3 * 2
