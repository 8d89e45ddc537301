"""Orthanc as a query/retrieve peer: studies with known accession numbers, our SCP as a modality.

Builds on ``tests.peers.orthanc.Orthanc`` (Orthanc + DICOMweb on loopback) through its REST API
only: ``load_study`` uploads generated CT/MR instances (``POST /instances``) and returns what was
stored (UIDs and pixel digests), ``allow_modality`` registers an AE title (``PUT /modalities``)
so Orthanc answers its C-FIND/C-GET/C-MOVE and knows where to send C-MOVE results, ``stop`` and
``restart`` take Orthanc down and bring it back on the same ports with the same storage,
``take_away``/``put_back`` make a study disappear for a while.
"""

from __future__ import annotations

import os
import subprocess
from dataclasses import dataclass, field

from pydicom.uid import generate_uid

from tests.dicomfiles import make_ct_series, pixel_digest
from tests.peers.orthanc import Orthanc, orthanc_binary

__all__ = [
    "LoadedStudy",
    "Orthanc",
    "allow_modality",
    "load_study",
    "put_back",
    "restart",
    "stop",
    "take_away",
]


@dataclass
class LoadedStudy:
    """What ``load_study`` stored: UIDs, per-series SOP UIDs and pixel digests."""

    accession: str
    study_uid: str
    patient_id: str
    series: dict[str, list[str]] = field(default_factory=dict)
    descriptions: dict[str, str] = field(default_factory=dict)
    modalities: dict[str, str] = field(default_factory=dict)
    digests: dict[str, str] = field(default_factory=dict)
    orthanc_ids: dict[str, str] = field(default_factory=dict)

    @property
    def sop_uids(self) -> set[str]:
        return set(self.digests)

    def series_uid(self, description: str) -> str:
        return next(uid for uid, d in self.descriptions.items() if d == description)


def load_study(
    orthanc: Orthanc,
    accession: str,
    series: list[tuple[str, str, int]] | None = None,
    *,
    rows: int = 32,
    cols: int = 32,
    patient_id: str | None = None,
    seed: int = 0,
) -> LoadedStudy:
    """Generate one study and upload it: ``series`` = ``[(modality, description, count), ...]``."""
    spec = series or [("CT", "generated series", 3)]
    study = LoadedStudy(accession, generate_uid(), patient_id or f"PID-{accession}")
    scratch = orthanc.folder / "upload"
    with orthanc.client() as client:
        for number, (modality, description, count) in enumerate(spec, 1):
            series_uid = generate_uid()
            study.series[series_uid] = []
            study.descriptions[series_uid] = description
            study.modalities[series_uid] = modality
            paths = make_ct_series(
                scratch,
                count,
                rows=rows,
                cols=cols,
                accession=accession,
                patient_id=study.patient_id,
                study_uid=study.study_uid,
                series_uid=series_uid,
                seed=seed + number,
                modality=modality,
                series_description=description,
                series_number=number,
            )
            for path in paths:
                sop_uid, digest = pixel_digest(path)
                answer = client.post(
                    "/instances",
                    content=path.read_bytes(),
                    headers={"Content-Type": "application/dicom"},
                )
                answer.raise_for_status()
                path.unlink()
                study.series[series_uid].append(sop_uid)
                study.digests[sop_uid] = digest
                study.orthanc_ids[sop_uid] = str(answer.json()["ID"])
    return study


def allow_modality(orthanc: Orthanc, aet: str, port: int, name: str = "dispatch") -> None:
    """Let ``aet`` query and retrieve, and make it a C-MOVE destination at 127.0.0.1:port."""
    body = {
        "AET": aet,
        "Host": "127.0.0.1",
        "Port": port,
        "AllowEcho": True,
        "AllowFind": True,
        "AllowGet": True,
        "AllowMove": True,
        "AllowStore": True,
    }
    with orthanc.client() as client:
        client.put(f"/modalities/{name}", json=body).raise_for_status()


def stop(orthanc: Orthanc) -> None:
    """Stop Orthanc (its ports and storage are kept for ``restart``)."""
    orthanc.stop()


def restart(orthanc: Orthanc) -> None:
    """Start the stopped Orthanc again with the same configuration (ports, storage)."""
    config = orthanc.folder / "orthanc.json"
    env = {**os.environ, "TCP_NODELAY": "1"}
    with orthanc._log.open("ab") as log:
        orthanc._proc = subprocess.Popen(
            [orthanc_binary(), str(config)], env=env, stdout=log, stderr=subprocess.STDOUT
        )
    if not orthanc._wait_ready():
        raise RuntimeError(f"Orthanc did not come back; log:\n{orthanc.log()[-2000:]}")


def take_away(orthanc: Orthanc, study: LoadedStudy) -> list[bytes]:
    """Delete ``study`` from Orthanc; returns its files for :func:`put_back`."""
    blobs = []
    with orthanc.client() as client:
        for orthanc_id in study.orthanc_ids.values():
            blobs.append(client.get(f"/instances/{orthanc_id}/file").raise_for_status().content)
        for orthanc_id in study.orthanc_ids.values():
            client.delete(f"/instances/{orthanc_id}").raise_for_status()
    return blobs


def put_back(orthanc: Orthanc, blobs: list[bytes]) -> None:
    """Store files again (same UIDs, so the same Orthanc ids)."""
    with orthanc.client() as client:
        for blob in blobs:
            client.post(
                "/instances", content=blob, headers={"Content-Type": "application/dicom"}
            ).raise_for_status()
