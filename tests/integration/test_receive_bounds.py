"""A retrieve's receiving is bounded: by object size, by the destination's free space, in memory.

A real C-GET peer (``tests/peers/get_scp.py``) sends instances larger than the limit, or more
than a small tmpfs can hold above the reserve. The receiving side runs in its own process, so
its peak memory (``ru_maxrss``) is what it alone used.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from blocks._association import DicomPeer
from blocks._dimse_qr import retrieve
from blocks.errors import PermanentTargetError
from blocks.qr import ReceiveLimits, RetrieveItem
from tests.dicomfiles import make_ct_instance
from tests.peers.get_scp import get_scp
from tests.peers.tmpfs import small_tmpfs

STUDY = "1.2.826.0.1.3680043.8.498.77"
SERIES = f"{STUDY}.1"
MiB = 1024 * 1024
ROOT = Path(__file__).resolve().parents[2]

#: Retrieves in a fresh interpreter; prints the outcome and the peak memory before and after.
CHILD = """
import json, resource, sys
from pathlib import Path
from blocks._association import DicomPeer
from blocks._dimse_qr import retrieve
from blocks.qr import ReceiveLimits, RetrieveItem
port, folder, limit = int(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3])
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
try:
    retrieve(
        DicomPeer("127.0.0.1", port, "GETSCP", "DISPATCH"),
        [RetrieveItem(sys.argv[4])],
        folder,
        method="get",
        limits=ReceiveLimits(max_instance_bytes=limit, free_space_reserve_bytes=0),
    )
    error = ""
except Exception as exc:
    error = str(exc)
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"error": error, "grew_kib": after - before}))
"""


def instance(folder: Path, number: int, side: int) -> Path:
    """A CT instance of about ``side * side * 2`` bytes of pixel data."""
    return make_ct_instance(
        folder / f"{number}.dcm",
        study_uid=STUDY,
        series_uid=SERIES,
        sop_uid=f"{SERIES}.{number}",
        index=number,
        rows=side,
        cols=side,
    )


def retrieve_in_child(port: int, folder: Path, limit: int) -> dict[str, Any]:
    done = subprocess.run(
        [sys.executable, "-c", CHILD, str(port), str(folder), str(limit), STUDY],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return dict(json.loads(done.stdout.strip().splitlines()[-1]))


def test_an_instance_over_the_limit_fills_neither_memory_nor_disk(tmp_path: Path) -> None:
    source = tmp_path / "source"
    big = instance(source, 1, 4096)  # 32 MiB of pixel data
    small = instance(source, 2, 64)
    with get_scp(source) as scp:
        refused = retrieve_in_child(scp.port, tmp_path / "refused", 512 * 1024)
        taken = retrieve_in_child(scp.port, tmp_path / "taken", 64 * MiB)

    assert "larger than retrieve_max_instance_bytes (524288 bytes)" in refused["error"]
    assert f"{SERIES}.1" in refused["error"]
    assert sorted(p.name for p in (tmp_path / "refused").iterdir()) == [f"{SERIES}.2.dcm"]
    assert refused["grew_kib"] < 16 * 1024, refused  # not the 32 MiB instance in memory

    # Under the limit: the whole object on disk, byte for byte, and still not in memory.
    assert taken["error"] == ""
    received = tmp_path / "taken" / f"{SERIES}.1.dcm"
    assert received.read_bytes()[132:].endswith(big.read_bytes()[-4096:])
    assert received.stat().st_size >= 32 * MiB
    assert (tmp_path / "taken" / f"{SERIES}.2.dcm").read_bytes()[-512:] == small.read_bytes()[-512:]
    assert taken["grew_kib"] < 16 * 1024, taken


def test_a_retrieve_stops_before_the_free_space_reserve(tmp_path: Path) -> None:
    source = tmp_path / "source"
    for number in range(1, 9):
        instance(source, number, 724)  # about 1 MiB each: 8 MiB in all
    reserve = 5 * MiB
    with small_tmpfs(tmp_path / "volume", "8m") as volume, get_scp(source) as scp:
        destination = volume / "case"
        peer = DicomPeer("127.0.0.1", scp.port, scp.aet, "DISPATCH")
        with pytest.raises(PermanentTargetError) as stopped:
            retrieve(
                peer,
                [RetrieveItem(STUDY)],
                destination,
                method="get",
                limits=ReceiveLimits(free_space_reserve_bytes=reserve),
            )
        free = shutil.disk_usage(volume).free
        left = sorted(p.name for p in destination.iterdir())
    assert "retrieve_free_space_reserve_bytes is 5242880" in str(stopped.value)
    assert free >= reserve
    assert 0 < len(left) < 8
    assert all(name.endswith(".dcm") and not name.startswith(".") for name in left), left
