"""Compressed test cases: CT instances losslessly encoded in the syntaxes archives store.

Each instance is first written uncompressed (``tests.dicomfiles``), which is the reference
decode (the encodings are lossless), then compressed by a tool other than the decoder under
test: DCMTK ``dcmcjpeg`` (JPEG lossless, first-order prediction) and ``dcmcjpls`` (JPEG-LS
lossless); JPEG 2000 lossless by OpenJPEG's encoder through pydicom (DCMTK has none).
"""

from __future__ import annotations

import hashlib
import subprocess
from dataclasses import dataclass
from pathlib import Path

from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.uid import JPEG2000Lossless, JPEGLosslessSV1, JPEGLSLossless

from tests.dicomfiles import make_ct_series
from tests.peers.dcmtk import dcmtk_binary

__all__ = ["COMPRESSED", "Reference", "attributes", "compress_case", "dataset_bytes"]

#: The syntaxes a compressed case holds, one instance each, in this order.
COMPRESSED = (str(JPEG2000Lossless), str(JPEGLSLossless), str(JPEGLosslessSV1))


@dataclass(frozen=True)
class Reference:
    """What a compressed instance must arrive as: its syntax on disk, the sha256 of its
    uncompressed original's pixel data, and every other attribute of the file on disk."""

    syntax: str
    pixels: str
    attributes: dict[str, str]


def attributes(ds: Dataset) -> dict[str, str]:
    """Every data element but the pixel data, as text (file meta excluded)."""
    return {str(e.tag): repr(e.value) for e in ds if e.keyword != "PixelData"}


def dataset_bytes(path: Path) -> bytes:
    """The file's bytes after the file meta: what a C-STORE carries unchanged."""
    from pynetdicom.dsutils import split_dataset

    return path.read_bytes()[split_dataset(path)[1] :]


def _compress(path: Path, syntax: str) -> None:
    out = path.with_suffix(".tmp")
    if syntax == JPEG2000Lossless:
        ds = dcmread(path)
        ds.compress(JPEG2000Lossless, encoding_plugin="pylibjpeg", generate_instance_uid=False)
        ds.save_as(out, enforce_file_format=True)
    else:
        tool = "dcmcjpeg" if syntax == JPEGLosslessSV1 else "dcmcjpls"
        subprocess.run([dcmtk_binary(tool), str(path), str(out)], check=True, capture_output=True)
    out.replace(path)


def compress_case(case: Path, *, rows: int = 64, cols: int = 64) -> dict[str, Reference]:
    """Add one instance per :data:`COMPRESSED` syntax to the ``case`` folder; SOP Instance UID
    → its :class:`Reference`."""
    out: dict[str, Reference] = {}
    files = make_ct_series(case, len(COMPRESSED), rows=rows, cols=cols, seed=7)
    for path, syntax in zip(files, COMPRESSED, strict=True):
        original = dcmread(path)
        pixels = hashlib.sha256(bytes(original.PixelData)).hexdigest()
        _compress(path, syntax)
        source = dcmread(path, stop_before_pixels=True)
        assert str(source.file_meta.TransferSyntaxUID) == syntax
        out[str(original.SOPInstanceUID)] = Reference(syntax, pixels, attributes(source))
    return out
