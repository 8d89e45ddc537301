"""Storage Commitment through ``dispatch_case``, with the listener ``serve`` runs.

Proves: with ``storage_commitment: require`` against Orthanc (which answers on a new
association), the case reaches success/ only after the answer reached the listener that
``serve`` opens for the targets using it, and task.json records the counts; a receiver that
stays silent until the timeout leaves the case in outgoing/ for a retry (counted), its target
in mercure's ``error`` state with the counts and the reason.
"""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

import pytest

from blocks._commitment import LISTENER_RECORD
from blocks.dicom import DicomTarget
from blocks.host import data_dir
from blocks.registry import aload_settings
from deployments.service.commitment_service import run_commitment_listener
from tests.cases import make_case
from tests.dispatch_env import DispatchEnv
from tests.peers.commitment_scp import commitment_scp
from tests.peers.net import free_port
from tests.peers.orthanc import Orthanc

pytestmark = pytest.mark.timeout(180)

OUR_AET = "DISPATCH"


@pytest.fixture
def listener_port(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> int:
    """This test's listener port, AE title and data directory (where the listener names itself)."""
    port = free_port()
    monkeypatch.setenv("DICOM_DISPATCH_STORAGE_COMMITMENT_PORT", str(port))
    monkeypatch.setenv("DICOM_DISPATCH_STORAGE_COMMITMENT_AET", OUR_AET)
    monkeypatch.setenv("DICOM_DISPATCH_HOME", str(tmp_path / "home"))
    (tmp_path / "home").mkdir()
    return port


def pacs(port: int, aet: str, **fields: object) -> DicomTarget:
    return DicomTarget(
        ip="127.0.0.1",
        port=str(port),
        aet_target=aet,
        aet_source=OUR_AET,
        backend="pynetdicom",
        storage_commitment="require",
        **fields,  # type: ignore[arg-type]
    )


def dispatch_beside_the_listener(env: DispatchEnv, case: Path) -> dict[str, object]:
    """``dispatch CASE`` while ``serve``'s listener task runs (as upkeep runs it)."""

    async def go() -> dict[str, object]:
        settings = await aload_settings()
        stop = asyncio.Event()
        listening = asyncio.create_task(run_commitment_listener(lambda: settings, stop))
        deadline = time.monotonic() + 20
        while not (data_dir() / LISTENER_RECORD).exists():
            assert not listening.done(), "the listener did not start"
            assert time.monotonic() < deadline
            await asyncio.sleep(0.05)
        try:
            return await asyncio.to_thread(env.dispatch, case)
        finally:
            stop.set()
            await listening

    result = asyncio.run(go())
    assert not (data_dir() / LISTENER_RECORD).exists(), "the listener's record goes with it"
    return result


def test_case_reaches_success_only_once_orthanc_committed(
    env: DispatchEnv, tmp_path: Path, listener_port: int
) -> None:
    modalities = {"dispatch": [OUR_AET, "127.0.0.1", listener_port]}
    with Orthanc(tmp_path / "orthanc", modalities=modalities) as orthanc:
        env.save_target(pacs(orthanc.dicom_port, orthanc.aet), "pacs")
        case = make_case(env.outgoing, ["pacs"], files=3)
        result = dispatch_beside_the_listener(env, case)
    assert result["location"] == "success"
    done = env.success / case.name
    status = env.task(done)["dispatch"]["status"]["pacs"]
    assert status["state"] == "complete"
    assert status["storage_commitment"]["committed"] == 3
    assert status["storage_commitment"]["pending"] == 0
    [report] = [json.loads(p.read_text()) for p in done.glob(".storage-commitment.*.report.json")]
    assert report["via"] == "listener"
    assert len(report["committed"]) == 3


def test_silence_leaves_the_case_for_a_retry(
    env: DispatchEnv, tmp_path: Path, listener_port: int
) -> None:
    with commitment_scp("silent") as scp:
        env.save_target(pacs(scp.port, scp.aet, storage_commitment_timeout=1.5), "pacs")
        case = make_case(env.outgoing, ["pacs"], files=2)
        result = dispatch_beside_the_listener(env, case)
    assert result["location"] == "outgoing"
    task = env.task(case)
    assert task["dispatch"]["retries"] == 1
    status = task["dispatch"]["status"]["pacs"]
    assert status["state"] == "error"
    assert "0 of 2 committed" in status["message"]
    assert status["storage_commitment"]["committed"] == 0
    assert len(scp.stored) == 2
    assert len(scp.actions) == 1


def test_a_mercure_target_imports_with_commitment_off(env: DispatchEnv) -> None:
    spec = {"target_type": "dicom", "ip": "127.0.0.1", "port": "104", "aet_target": "PACS"}
    block = env.import_one_target("PACS_Main", spec)
    assert block.storage_commitment == "off"
    assert "storage_commitment" not in block.test_connection()
