"""Retrieve one study of 200 × 0.5 MB CT images from Orthanc; ratios against DCMTK ``getscu``.

    python bench/retrieve_bench.py [--images 200] [--size 512] [--repeat 3]

One Orthanc (Debian packages ``orthanc`` + ``orthanc-dicomweb``, ``TCP_NODELAY=1``) on
127.0.0.1 holds the study. Each method retrieves the whole study into a fresh folder, in a
fresh Python process (imports not timed; the process's peak RSS is reported). The baseline is
DCMTK's ``getscu`` (study root C-GET, ``-pdu 131072``, ``TCP_NODELAY=1``) timed as a whole
process, in the same run. Medians of ``--repeat`` runs after one warm-up each; the machine is
shared and noisy, so compare the ratios, not the seconds.

Methods: ``DicomTarget.retrieve`` with C-GET and C-MOVE, each with the pynetdicom backend
(in-process Storage SCP) and the DCMTK backend (``getscu``/``movescu`` run for us, files
checked and renamed by us), and ``DicomWebTarget.retrieve`` (WADO-RS streamed).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench._common import median, timed_tool  # noqa: E402

WORKER = r"""
import json, resource, sys, time
from pathlib import Path
from blocks.dicom import DicomTarget
from blocks.dicomweb import DicomWebTarget
kind, fields, dest = sys.argv[1], json.loads(sys.argv[2]), Path(sys.argv[3])
target = (DicomWebTarget if kind == "web" else DicomTarget)(**fields)
began = time.perf_counter()
result = target.retrieve("BENCH-1", None, dest)
wall = time.perf_counter() - began
rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
print(json.dumps({"wall": wall, "rss_mb": rss, "instances": len(result.instances)}))
"""


def _run_worker(kind: str, fields: dict[str, object], dest: Path) -> dict[str, float]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run(
        [sys.executable, "-c", WORKER, kind, json.dumps(fields), str(dest)],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
        check=False,
    )
    if done.returncode != 0:
        raise RuntimeError(done.stderr[-2000:])
    return dict(json.loads(done.stdout.strip().splitlines()[-1]))


def _getscu(port: int, aet: str, study_uid: str, dest: Path) -> float:
    from blocks._dcmtk_qr import dcmtk_tool

    tool = dcmtk_tool("getscu")
    if tool is None:
        raise SystemExit("DCMTK getscu not found (Debian package 'dcmtk')")
    dest.mkdir(parents=True)
    args = [
        tool,
        "-S",
        "-aet",
        "DISPATCH",
        "-aec",
        aet,
        "-pdu",
        "131072",
        "-od",
        str(dest),
        "-k",
        "QueryRetrieveLevel=STUDY",
        "-k",
        f"StudyInstanceUID={study_uid}",
        "127.0.0.1",
        str(port),
    ]
    wall = timed_tool(args)
    count = sum(1 for p in dest.iterdir() if p.is_file())
    if count == 0:
        raise RuntimeError("getscu received nothing")
    return wall


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=200)
    parser.add_argument("--size", type=int, default=512, help="rows = columns (512: 0.5 MB)")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()

    from tests.peers.net import free_port
    from tests.peers.orthanc_qr import Orthanc, allow_modality, load_study

    base = Path(tempfile.mkdtemp(prefix="retrieve-bench-"))
    try:
        with Orthanc(base / "orthanc") as orthanc:
            move_port = free_port()
            allow_modality(orthanc, "DISPATCH", move_port)
            started = time.perf_counter()
            study = load_study(
                orthanc,
                "BENCH-1",
                [("CT", "bench", args.images)],
                rows=args.size,
                cols=args.size,
            )
            load_s = time.perf_counter() - started
            dicom = {
                "ip": "127.0.0.1",
                "port": str(orthanc.dicom_port),
                "aet_target": orthanc.aet,
                "aet_source": "DISPATCH",
                "direction": "pull",
                "move_destination_port": move_port,
                "move_listen_address": "127.0.0.1",
                "target_name": "bench",
            }
            methods: dict[str, tuple[str, dict[str, object]]] = {
                "C-GET pynetdicom": ("dicom", {**dicom, "retrieve_method": "get"}),
                "C-GET dcmtk backend": (
                    "dicom",
                    {**dicom, "retrieve_method": "get", "retrieve_backend": "dcmtk"},
                ),
                "C-MOVE pynetdicom": ("dicom", {**dicom, "retrieve_method": "move"}),
                "C-MOVE dcmtk backend": (
                    "dicom",
                    {**dicom, "retrieve_method": "move", "retrieve_backend": "dcmtk"},
                ),
                "WADO-RS": (
                    "web",
                    {"url": orthanc.dicomweb_url, "direction": "pull", "target_name": "bench"},
                ),
            }
            runs = 0

            def folder() -> Path:
                nonlocal runs
                runs += 1
                return base / f"out-{runs}"

            _getscu(orthanc.dicom_port, orthanc.aet, study.study_uid, folder())  # warm-up
            baseline: list[float] = []
            times: dict[str, list[float]] = {name: [] for name in methods}
            rss: dict[str, float] = {}
            for name, (kind, fields) in methods.items():  # warm-up (and correctness) pass
                result = _run_worker(kind, fields, folder())
                assert result["instances"] == args.images, (name, result)
            for _ in range(args.repeat):  # interleaved, so drift hits every method alike
                baseline.append(_getscu(orthanc.dicom_port, orthanc.aet, study.study_uid, folder()))
                for name, (kind, fields) in methods.items():
                    result = _run_worker(kind, fields, folder())
                    times[name].append(result["wall"])
                    rss[name] = max(rss.get(name, 0.0), result["rss_mb"])
                for out in base.glob("out-*"):
                    shutil.rmtree(out, ignore_errors=True)
    finally:
        shutil.rmtree(base, ignore_errors=True)

    reference = median(baseline)
    size_mb = args.images * args.size * args.size * 2 / 1e6
    report = {
        "images": args.images,
        "megabytes": round(size_mb, 1),
        "load_seconds": round(load_s, 2),
        "getscu_seconds": round(reference, 3),
        "methods": {
            name: {
                "seconds": round(median(values), 3),
                "ratio_to_getscu": round(median(values) / reference, 2),
                "peak_rss_mb": round(rss[name], 1),
            }
            for name, values in times.items()
        },
    }
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    print(f"{args.images} images, {size_mb:.0f} MB, Orthanc on 127.0.0.1 (TCP_NODELAY=1)")
    print(f"{'DCMTK getscu (baseline)':<24} {reference:7.3f} s   1.00")
    for name, row in report["methods"].items():  # type: ignore[union-attr]
        print(
            f"{name:<24} {row['seconds']:7.3f} s  {row['ratio_to_getscu']:5.2f}"
            f"   peak RSS {row['peak_rss_mb']:.0f} MB"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
