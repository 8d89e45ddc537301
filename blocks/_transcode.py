"""Transfer-syntax conversion for a DICOM send: what is proposed, and decoding when refused.

Modalities and archives store JPEG 2000, JPEG-LS or JPEG lossless; many receivers (AI servers,
research nodes) accept only uncompressed syntaxes. A file is therefore proposed in its own
transfer syntax *and* the uncompressed ones, on separate presentation contexts (as DCMTK and
dcm4chee do, so a receiver that takes everything keeps the file as it is), and decoded only when
the receiver accepted no context in the file's own syntax. ``convert="never"`` proposes the
file's own syntax only (mercure's behaviour): a refusal fails with the syntax named.

Decoders are well-kept, permissively licensed libraries, chosen per syntax rather than left to
pydicom's first available plugin, so a result never depends on what else happens to be
installed: python-gdcm for the JPEG family, pyjpegls (CharLS) for JPEG-LS, pylibjpeg-openjpeg
for JPEG 2000, pylibjpeg-rle for RLE (never pylibjpeg-libjpeg, which is GPLv3). The decoded size
(rows × columns × frames × samples × bytes per sample) is checked against a limit *before*
anything is decoded: a header cannot make us allocate gigabytes.

``preferred_transfer_syntax`` goes the other way, for bandwidth to remote receivers: a file
stored uncompressed is proposed in that lossless compressed syntax first and encoded when the
receiver accepts it. Files already compressed are sent as they are (re-encoding them would gain
little and lose their original encoding).

The source file is only ever read (through the descriptor the caller opened without following a
link); the SOP Instance UID and every other attribute are kept but the transfer syntax and what
it implies (pixel data encoding; a YCbCr JPEG decoded to RGB). Prefect-free.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, BinaryIO

from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.uid import (
    JPEG2000,
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    RLELossless,
)

if TYPE_CHECKING:
    from blocks._dimse_results import InstanceResult

__all__ = [
    "DECODERS",
    "ENCODERS",
    "JPEG_2000_SYNTAXES",
    "JPEG_LS_SYNTAXES",
    "JPEG_SYNTAXES",
    "MAX_DECODED_BYTES",
    "UNCOMPRESSED",
    "Conversion",
    "ConversionError",
    "decode",
    "decoded_size",
    "describe",
    "encode",
    "is_uncompressed",
    "preferred_syntax",
    "sent_as",
    "syntax_name",
    "write_decoded",
]

#: What a refused file is decoded to (pynetdicom re-encodes between these two itself).
UNCOMPRESSED: tuple[str, ...] = (ExplicitVRLittleEndian, ImplicitVRLittleEndian)
_LITTLE_ENDIAN_UNCOMPRESSED = frozenset(
    {ExplicitVRLittleEndian, ImplicitVRLittleEndian, DeflatedExplicitVRLittleEndian}
)
#: The compressed syntaxes by family: named once here, for our decoders below and for what
#: another program decodes (``blocks._dcmsend_convert.DCMTK_DECODES``).
JPEG_SYNTAXES: tuple[str, ...] = (
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLossless,
    JPEGLosslessSV1,
)
JPEG_LS_SYNTAXES: tuple[str, ...] = (JPEGLSLossless, JPEGLSNearLossless)
JPEG_2000_SYNTAXES: tuple[str, ...] = (JPEG2000Lossless, JPEG2000)
#: The pydicom decoding plugin per compressed syntax (module docstring: which library, why).
DECODERS: dict[str, str] = {
    **dict.fromkeys(JPEG_SYNTAXES, "gdcm"),
    **dict.fromkeys(JPEG_LS_SYNTAXES, "pyjpegls"),
    **dict.fromkeys(JPEG_2000_SYNTAXES, "pylibjpeg"),
    RLELossless: "pylibjpeg",
}
#: The lossless compressed syntaxes ``preferred_transfer_syntax`` may name, and their encoder.
ENCODERS: dict[str, str] = {
    RLELossless: "pylibjpeg",
    JPEGLSLossless: "pyjpegls",
    JPEG2000Lossless: "pylibjpeg",
}
#: Default bound on one decoded (or encoded) instance's pixel data: 2 GiB.
MAX_DECODED_BYTES = 2 * 1024**3


class ConversionError(Exception):
    """A file that cannot be converted (no decoder, over the limit, corrupt): permanent.

    The message names the file and its transfer syntax.
    """


def syntax_name(uid: str) -> str:
    """A transfer syntax's name for messages (``JPEG 2000 Image Compression (Lossless
    Only)``), or the UID itself when pydicom does not know it."""
    name = UID(uid).name if uid else ""
    return name if name and name != uid else uid or "no transfer syntax"


def is_uncompressed(uid: str) -> bool:
    """Little-endian native pixel data: pynetdicom re-encodes between these without decoding."""
    return UID(uid) in _LITTLE_ENDIAN_UNCOMPRESSED


@dataclass(frozen=True)
class Conversion:
    """A target's conversion settings (picklable: they travel to the sender processes).

    ``convert``: decode a file whose own syntax the receiver refused (``when_refused``) or fail
    it (``never``). ``preferred``: a lossless compressed syntax an uncompressed file is encoded
    in when the receiver accepts it. ``max_decoded_bytes``: the largest pixel data decoded.
    """

    convert: bool = True
    preferred: str | None = None
    max_decoded_bytes: int = MAX_DECODED_BYTES

    def proposals(self, transfer_syntax: str) -> list[tuple[str, ...]]:
        """The presentation contexts (transfer syntax lists) a file in ``transfer_syntax``
        needs, most wanted first: the preferred syntax, its own, then the uncompressed ones
        (each its own context, so the receiver's choice among them is ours)."""
        own: tuple[str, ...] = (transfer_syntax,)
        out: list[tuple[str, ...]] = []
        if is_uncompressed(transfer_syntax):
            own += tuple(s for s in UNCOMPRESSED if s != transfer_syntax)
            if self.preferred and self.preferred != transfer_syntax:
                out.append((self.preferred,))
            return [*out, own]
        out.append(own)
        if self.convert and transfer_syntax in DECODERS:
            out.append(UNCOMPRESSED)
        return out


def decoded_size(ds: Dataset) -> int:
    """Bytes of the pixel data once decoded: rows × columns × frames × samples × bytes."""
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    samples = int(ds.get("SamplesPerPixel", 1) or 1)
    bits = int(ds.get("BitsAllocated", 8) or 8)
    return int(ds.Rows) * int(ds.Columns) * frames * samples * ((bits + 7) // 8)


def _read(source: BinaryIO, name: str, syntax: str, limit: int) -> Dataset:
    """The dataset in ``source``, its decoded size checked against ``limit``."""
    with _failing_as(f"cannot read {name} ({syntax_name(syntax)})"):
        ds = dcmread(source)
        size = decoded_size(ds)
    if size > limit:
        raise ConversionError(
            f"{name} ({syntax_name(syntax)}) would decode to {size} bytes, over the limit of "
            f"{limit} bytes"
        )
    return ds


def decode(source: BinaryIO, name: str, syntax: str, limit: int = MAX_DECODED_BYTES) -> Dataset:
    """The dataset in ``source`` (a file in the compressed ``syntax``) decoded to Explicit VR
    Little Endian; ``ConversionError`` naming ``name`` and the syntax when it cannot be."""
    plugin = DECODERS.get(syntax)
    if plugin is None:
        raise ConversionError(f"{name}: no decoder for {syntax_name(syntax)}")
    ds = _read(source, name, syntax, limit)
    if "PixelData" not in ds:
        raise ConversionError(f"{name} ({syntax_name(syntax)}) has no pixel data to decode")
    with _failing_as(f"cannot decode {name} ({syntax_name(syntax)}) with {plugin}"):
        ds.decompress(decoding_plugin=plugin, generate_instance_uid=False)
    return ds


def encode(
    source: BinaryIO, name: str, syntax: str, target: str, limit: int = MAX_DECODED_BYTES
) -> Dataset:
    """The dataset in ``source`` (uncompressed ``syntax``) encoded in ``target``, one of
    :data:`ENCODERS`; ``ConversionError`` naming ``name`` when it cannot be."""
    plugin = ENCODERS.get(target)
    if plugin is None:
        raise ConversionError(f"{name}: no encoder for {syntax_name(target)}")
    ds = _read(source, name, syntax, limit)
    with _failing_as(f"cannot encode {name} in {syntax_name(target)} with {plugin}"):
        ds.compress(target, encoding_plugin=plugin, generate_instance_uid=False)
    return ds


def write_decoded(
    source: BinaryIO, name: str, syntax: str, out: BinaryIO, limit: int = MAX_DECODED_BYTES
) -> None:
    """:func:`decode` ``source`` and write it as a DICOM file (with file meta) to ``out``."""
    ds = decode(source, name, syntax, limit)
    ds.save_as(out, enforce_file_format=True)


@contextmanager
def _failing_as(what: str) -> Iterator[None]:
    """Any error of pydicom or a codec plugin inside becomes a ``ConversionError`` ``what:
    <first line of it>``: the case's error names the file and step, not a library's traceback."""
    try:
        yield
    except Exception as exc:
        raise ConversionError(f"{what}: {_first(exc)}") from None


def _first(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def preferred_syntax(value: Any) -> str | None:
    """``preferred_transfer_syntax`` as a UID: a UID or pydicom keyword of one of
    :data:`ENCODERS`; empty is ``None``; anything else a ``ValueError`` listing the choices."""
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    text = str(value).strip()
    for uid in ENCODERS:
        if text in (uid, UID(uid).keyword):
            return uid
    choices = ", ".join(f"{UID(u).keyword} ({u})" for u in ENCODERS)
    raise ValueError(f"preferred_transfer_syntax {text!r} is not one of {choices}")


def sent_as(instances: Iterable[InstanceResult]) -> dict[str, int]:
    """What went over the network, per syntax: instances answered by the peer counted by
    ``"<network syntax>"``, or ``"<original> -> <network syntax>"`` when converted."""
    out: dict[str, int] = {}
    for instance in instances:
        network = instance.network_transfer_syntax
        if instance.status is None or not network:
            continue
        original = instance.transfer_syntax
        key = syntax_name(network)
        if original and original != network:
            key = f"{syntax_name(original)} -> {key}"
        out[key] = out.get(key, 0) + 1
    return out


def describe(counts: dict[str, int]) -> str:
    """``sent as: 2 × JPEG-LS ... -> Explicit VR Little Endian, 1 × ...`` for a detail line."""
    if not counts:
        return "nothing answered"
    return "sent as: " + ", ".join(f"{n} × {what}" for what, n in counts.items())
