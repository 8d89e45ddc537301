"""Generated DICOM test data: real, valid CT instances with known UIDs and pixel data.

Used by the tests and by bench/, so the data is cheap to make and deterministic per seed.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pydicom.dataset import FileDataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

__all__ = [
    "make_ct_instance",
    "make_ct_series",
    "pixel_digest",
    "pixel_digests",
    "received_digests",
]


def make_ct_instance(
    path: Path,
    *,
    study_uid: str,
    series_uid: str,
    sop_uid: str,
    index: int = 1,
    rows: int = 64,
    cols: int = 64,
    accession: str = "ACC0001",
    patient_id: str = "MRN0001",
    seed: int = 0,
    modality: str = "CT",
    series_description: str = "generated series",
    series_number: int = 1,
) -> Path:
    """Write one CT Image Storage instance (explicit VR little endian) to ``path``; ``modality``
    only labels it (a query peer's series of several modalities)."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = "1.2.826.0.1.3680043.8.498.1"
    ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = sop_uid
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = series_uid
    ds.PatientName = "TEST^PATIENT"
    ds.PatientID = patient_id
    ds.AccessionNumber = accession
    ds.Modality = modality
    ds.StudyDescription = "generated study"
    ds.SeriesDescription = series_description
    ds.StudyDate = "20260101"
    ds.StudyTime = "120000"
    ds.StudyID = "1"
    ds.SeriesNumber = series_number
    ds.InstanceNumber = index
    ds.Rows = rows
    ds.Columns = cols
    ds.BitsAllocated = 16
    ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 1
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.RescaleIntercept = -1024
    ds.RescaleSlope = 1
    ds.PixelData = random.Random(seed * 100003 + index).randbytes(rows * cols * 2)
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


def make_ct_series(
    folder: Path,
    count: int,
    *,
    rows: int = 64,
    cols: int = 64,
    accession: str = "ACC0001",
    patient_id: str = "MRN0001",
    study_uid: str | None = None,
    series_uid: str | None = None,
    seed: int = 0,
    **labels: Any,
) -> list[Path]:
    """Write ``count`` instances of one series as ``<SeriesUID>#<n>.dcm`` (mercure's naming);
    ``labels`` (modality, series_description, series_number) go to every instance."""
    study_uid = study_uid or generate_uid()
    series_uid = series_uid or generate_uid()
    return [
        make_ct_instance(
            folder / f"{series_uid}#{i:04d}.dcm",
            study_uid=study_uid,
            series_uid=series_uid,
            sop_uid=generate_uid(),
            index=i,
            rows=rows,
            cols=cols,
            accession=accession,
            patient_id=patient_id,
            seed=seed,
            **labels,
        )
        for i in range(1, count + 1)
    ]


def pixel_digest(path: Path) -> tuple[str, str]:
    """(SOP Instance UID, sha256 of the pixel data bytes) of one file."""
    from pydicom import dcmread

    ds = dcmread(path)
    return str(ds.SOPInstanceUID), hashlib.sha256(bytes(ds.PixelData)).hexdigest()


def pixel_digests(folder: Path) -> dict[str, str]:
    """SOP Instance UID -> pixel digest of every ``*.dcm`` below ``folder`` (what was sent)."""
    return dict(pixel_digest(p) for p in folder.rglob("*.dcm"))


def received_digests(files: Mapping[str, Path]) -> dict[str, str]:
    """SOP Instance UID -> pixel digest of the file a peer stored for it (what arrived), to be
    compared with :func:`pixel_digests` of what was sent."""
    return {uid: pixel_digest(path)[1] for uid, path in files.items()}
