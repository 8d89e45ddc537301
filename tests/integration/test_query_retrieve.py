"""Query and retrieve against a real Orthanc (DICOM and DICOMweb), through the blocks, the flows,
the CLI commands, and batches of ``retrieve`` deployment runs served by a real runner.

One file (over 500 lines) because its tests share one Orthanc with its studies loaded and one
runner process, which take most of a minute to start."""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import os
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from uuid import UUID

import pytest

from blocks.dicom import DicomTarget
from blocks.dicomweb import DicomWebTarget
from blocks.errors import (
    AccessionNotFound,
    ConfigError,
    PermanentTargetError,
    QueryError,
    TransientTargetError,
)
from tests.dicomfiles import pixel_digests, received_digests
from tests.dispatch_env import DispatchEnv
from tests.peers.dcmtk import StoreSCP
from tests.peers.net import free_port
from tests.peers.orthanc_qr import (
    LoadedStudy,
    Orthanc,
    allow_modality,
    load_study,
    put_back,
    restart,
    stop,
    take_away,
)
from tests.peers.prefect_server import server_has
from tests.service import wait_for

OUR_AET = "DISPATCH"
SOURCE = "orthanc_qr"
WEB_SOURCE = "orthanc_web"


class Peer:
    """The module's Orthanc, its studies by accession number, and our C-MOVE port."""

    def __init__(self, orthanc: Orthanc, move_port: int) -> None:
        self.orthanc = orthanc
        self.move_port = move_port
        self.studies: dict[str, LoadedStudy] = {}

    def web_target(self, **fields: Any) -> DicomWebTarget:
        values: dict[str, Any] = {
            "url": self.orthanc.dicomweb_url,
            "direction": "both",
            "target_name": WEB_SOURCE,
        }
        values.update(fields)
        return DicomWebTarget(**values)

    def dicom_target(self, **fields: Any) -> DicomTarget:
        values: dict[str, Any] = {
            "ip": "127.0.0.1",
            "port": str(self.orthanc.dicom_port),
            "aet_target": self.orthanc.aet,
            "aet_source": OUR_AET,
            "direction": "pull",
            "move_destination_port": self.move_port,
            "move_listen_address": "127.0.0.1",
            "dimse_timeout": 10,
            "target_name": SOURCE,
            "retrieve_backend": "pynetdicom",  # the default (auto) is tested on its own
        }
        values.update(fields)
        return DicomTarget(**values)


@pytest.fixture(scope="module")
def peer(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Peer]:
    with Orthanc(tmp_path_factory.mktemp("orthanc-qr")) as orthanc:
        p = Peer(orthanc, free_port())
        allow_modality(orthanc, OUR_AET, p.move_port)
        p.studies["QR-A"] = load_study(
            orthanc, "QR-A", [("CT", "head", 3), ("MR", "knee", 2), ("CT", "neck", 2)]
        )
        for accession in ("QR-B", "QR-C", "QR-D"):
            p.studies[accession] = load_study(orthanc, accession, [("CT", "chest", 2)])
        yield p


@pytest.fixture(scope="module")
def runner(prefect_server: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A process serving the query deployments, as ``serve`` does (runner polls every second)."""
    log = tmp_path_factory.mktemp("runner") / "runner.log"
    env = {**os.environ, "PREFECT_RUNNER_POLL_FREQUENCY": "1", "PREFECT_API_URL": prefect_server}
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "deployments.query_service", "--limit", "3"],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        wait_for(lambda: _deployment_exists("retrieve/retrieve"), 60, "the retrieve deployment")
        yield log
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(3)
        except subprocess.TimeoutExpired:  # nothing of ours runs any more: no need to wait
            proc.kill()
            proc.wait(10)


def _deployment_exists(name: str) -> bool:
    return server_has(lambda client: client.read_deployment_by_name(name))


def expected(study: LoadedStudy, *descriptions: str) -> dict[str, str]:
    if not descriptions:
        return dict(study.digests)
    wanted = {u for d in descriptions for u in study.series[study.series_uid(d)]}
    return {uid: digest for uid, digest in study.digests.items() if uid in wanted}


def cli(*argv: str) -> int:
    """Run one of our commands in this process, as ``dicom-dispatch`` parses and calls it."""
    from deployments.cli import main

    return main(argv)


def batch(batch_id: str) -> Any:
    from flows.query import batch_status

    return asyncio.run(batch_status(batch_id))


def batch_status_of(batch_id: str) -> Callable[[], Any]:
    return lambda: batch(batch_id).as_dict()


def wait_batch(batch_id: str, state: str, timeout: float) -> Any:
    wait_for(
        lambda: batch(batch_id).state in (state, "Failed", "Completed"),
        timeout,
        state,
        show=batch_status_of(batch_id),
    )
    status = batch(batch_id)
    assert status.state == state, status.as_dict()
    return status


def batch_run_state(batch_id: str) -> Any:
    """The batch run's own state, as the UI's runs list shows it."""
    from prefect.client.orchestration import get_client

    async def read() -> Any:
        async with get_client() as client:
            return (await client.read_flow_run(UUID(batch_id))).state

    return asyncio.run(read())


def run_batch(env: DispatchEnv, accessions: list[str], dest: Path, **kw: Any) -> str:
    from flows.query import retrieve_batch

    result = asyncio.run(retrieve_batch(SOURCE, accessions, None, str(dest), None, **kw))
    return str(result["batch_id"])


# ------------------------------------------------------------------------------------- find


def test_c_find_by_accession_with_and_without_filters(peer: Peer) -> None:
    target = peer.dicom_target()
    study = peer.studies["QR-A"]

    studies = target.find("QR-A", level="study")
    assert [(r["StudyInstanceUID"], r["NumberOfStudyRelatedInstances"]) for r in studies] == [
        (study.study_uid, 7)
    ]
    series = target.find("QR-A")
    assert [r["SeriesDescription"] for r in series] == ["head", "knee", "neck"]
    assert series[1]["Modality"] == "MR"
    assert series[1]["NumberOfSeriesRelatedInstances"] == 2
    assert json.loads(json.dumps(series)) == series  # JSON-serialisable rows

    assert [r["SeriesDescription"] for r in target.find("QR-A", {"Modality": "CT"})] == [
        "head",
        "neck",
    ]
    several = target.find("QR-A", {"SeriesDescription": ["knee", "neck", "nothing"]})
    assert [r["SeriesDescription"] for r in several] == ["knee", "neck"]
    assert target.find("QR-A", {"SeriesDescription": "he*"})[0]["SeriesDescription"] == "head"
    assert target.find("QR-A", {"Modality": "US"}) == []
    assert target.find("QR-A", {"Modality": "MR"}, level="study")[0]["AccessionNumber"] == "QR-A"
    assert target.find("QR-NOPE") == []

    with pytest.raises(QueryError, match="unknown DICOM keyword 'SeriesDescr'"):
        target.find("QR-A", {"SeriesDescr": "head"})
    with pytest.raises(QueryError, match="wildcard"):
        target.find("QR-*")
    with pytest.raises(ConfigError, match="direction"):
        peer.dicom_target(direction="push").find("QR-A")


def test_qido_by_accession_with_and_without_filters(peer: Peer) -> None:
    target = peer.web_target()
    study = peer.studies["QR-A"]

    studies = target.find("QR-A", level="study")
    assert [(r["StudyInstanceUID"], r["NumberOfStudyRelatedInstances"]) for r in studies] == [
        (study.study_uid, 7)
    ]
    assert [r["SeriesDescription"] for r in target.find("QR-A")] == ["head", "knee", "neck"]
    assert [r["SeriesDescription"] for r in target.find("QR-A", {"Modality": "CT"})] == [
        "head",
        "neck",
    ]
    several = target.find("QR-A", {"SeriesDescription": ["knee", "neck", "nothing"]})
    assert [r["SeriesDescription"] for r in several] == ["knee", "neck"]
    assert target.find("QR-A", {"Modality": ["US", "XA"]}) == []
    assert target.find("QR-NOPE") == []
    assert target.find("QR-A") == peer.dicom_target().find("QR-A")  # same rows as C-FIND
    with pytest.raises(QueryError, match="unknown DICOM keyword"):
        target.find("QR-A", {"Modalityy": "CT"})


# --------------------------------------------------------------------------------- retrieve


@pytest.mark.parametrize(
    ("method", "backend"),
    [("get", "pynetdicom"), ("move", "pynetdicom"), ("get", "dcmtk"), ("move", "dcmtk")],
)
def test_retrieve_gets_exactly_the_expected_instances(
    peer: Peer, tmp_path: Path, method: str, backend: str
) -> None:
    target = peer.dicom_target(retrieve_method=method, retrieve_backend=backend)
    study = peer.studies["QR-A"]
    seen: list[tuple[int, int | None]] = []

    whole = target.retrieve("QR-A", None, tmp_path / "all", lambda n, t: seen.append((n, t)))
    assert pixel_digests(tmp_path / "all") == expected(study)
    assert sorted(p.name for p in (tmp_path / "all").iterdir()) == sorted(
        f"{uid}.dcm" for uid in study.digests
    )
    assert whole.expected == 7
    assert seen[0] == (0, 7)
    assert seen[-1][0] == 7

    target.retrieve("QR-A", {"SeriesDescription": ["knee", "neck"]}, tmp_path / "some")
    assert pixel_digests(tmp_path / "some") == expected(study, "knee", "neck")


def test_wado_rs_streams_exactly_the_expected_instances(peer: Peer, tmp_path: Path) -> None:
    target = peer.web_target()
    study = peer.studies["QR-A"]
    seen: list[tuple[int, int | None]] = []

    result = target.retrieve("QR-A", None, tmp_path / "all", lambda n, t: seen.append((n, t)))
    assert pixel_digests(tmp_path / "all") == expected(study)
    assert (result.method, result.expected, seen[0], seen[-1]) == ("WADO-RS", 7, (0, 7), (7, 7))

    target.retrieve("QR-A", {"Modality": "MR"}, tmp_path / "mr")
    assert pixel_digests(tmp_path / "mr") == expected(study, "knee")
    with pytest.raises(AccessionNotFound):
        target.retrieve("QR-NOPE", None, tmp_path / "none")


def test_retrieve_of_an_unknown_accession_fails_clearly(peer: Peer, tmp_path: Path) -> None:
    with pytest.raises(AccessionNotFound, match="No series found with accession"):
        peer.dicom_target().retrieve("QR-NOPE", None, tmp_path / "x")


def test_move_to_an_unknown_destination_is_a_permanent_error(peer: Peer, tmp_path: Path) -> None:
    target = peer.dicom_target(retrieve_method="move", move_destination_aet="NOBODY")
    with pytest.raises(PermanentTargetError, match="C-MOVE at .* answered 0x"):
        target.retrieve("QR-B", None, tmp_path / "x")


# ------------------------------------------------------------------------- flows and CLI


def test_query_and_retrieve_flows_through_the_cli(
    env: DispatchEnv, peer: Peer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from prefect.client.orchestration import get_client

    from flows.query import latest_artifact

    env.save_target(peer.dicom_target(), SOURCE)
    assert cli("query", SOURCE, "--accession", "QR-A", "--filter", "Modality=MR", "--json") == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["SeriesDescription"] for r in rows] == ["knee"]

    async def artifact() -> Any:
        async with get_client() as client:
            return await latest_artifact(client, "query-qr-a")

    assert asyncio.run(artifact()).type == "table"
    env.save_target(peer.web_target(), WEB_SOURCE)
    assert cli("query", WEB_SOURCE, "--accession", "QR-A", "--level", "study", "--json") == 0
    assert json.loads(capsys.readouterr().out)[0]["NumberOfStudyRelatedInstances"] == 7

    assert cli("retrieve", SOURCE, "--accession", "QR-B", "--dest", str(tmp_path), "--json") == 0
    result = json.loads(capsys.readouterr().out)
    accession_dir = Path(result["destination"])
    assert accession_dir == tmp_path / result["job_id"] / "QR-B"
    assert (tmp_path / result["job_id"] / ".complete").exists()
    assert pixel_digests(accession_dir) == expected(peer.studies["QR-B"])
    assert not [p for p in (tmp_path / result["job_id"]).iterdir() if p.name.endswith(".partial")]

    assert cli("retrieve", SOURCE, "--accession", "QR-B", "--to-outgoing") == 2
    assert "--targets" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli("query", SOURCE, "--accession", "QR-A", "--filter", "Nonsense=1")


def test_retrieve_into_outgoing_is_then_dispatched_to_a_storescp(
    env: DispatchEnv, peer: Peer, tmp_path: Path
) -> None:
    from flows.query import retrieve

    env.save_target(peer.dicom_target(retrieve_method="move"), SOURCE)
    with StoreSCP(tmp_path / "pacs") as scp:
        env.save_target(
            DicomTarget(ip="127.0.0.1", port=str(scp.port), aet_target="STORESCP"), "pacs"
        )
        result = asyncio.run(retrieve(SOURCE, "QR-A", {"Modality": "CT"}, "outgoing", ["pacs"]))
        case = Path(result["destination"])
        assert case.parent == env.outgoing
        assert not (case / ".lock").exists()
        task = env.task(case)
        assert task["dispatch"]["target_name"] == ["pacs"]
        assert task["info"]["acc"] == "QR-A"

        outcome = env.dispatch(case)

        assert outcome["location"] == "success", outcome
        received = received_digests(scp.received())
    assert received == expected(peer.studies["QR-A"], "head", "neck")


def test_the_settings_bound_what_a_retrieve_receives(
    env: DispatchEnv, peer: Peer, tmp_path: Path
) -> None:
    """``retrieve_max_instance_bytes`` reaches the receiver: nothing of the accession is kept."""
    from flows.query import retrieve

    env.save_target(peer.dicom_target(retrieve_method="get"), SOURCE)
    env.save_settings(retrieve_max_instance_bytes=1024, quick_retry_delays=[])
    with pytest.raises(PermanentTargetError, match="larger than retrieve_max_instance_bytes"):
        asyncio.run(retrieve(SOURCE, "QR-C", None, str(tmp_path / "jobs")))
    assert not [p for p in (tmp_path / "jobs").rglob("*") if p.is_file()]


def test_url_credentials_reach_no_error_text_nor_task_json(
    env: DispatchEnv, peer: Peer, tmp_path: Path
) -> None:
    """A DICOMweb URL with a login in it: the login is used, and shown nowhere."""
    from flows.query import retrieve

    secret = "s3cr3t-Pw"
    host = peer.orthanc.dicomweb_url.split("://", 1)[1]
    env.save_target(peer.web_target(url=f"http://dispatch:{secret}@{host}"), WEB_SOURCE)
    closed = DicomWebTarget(
        url=f"http://dispatch:{secret}@127.0.0.1:{free_port()}/dicom-web", direction="both"
    )
    with pytest.raises(TransientTargetError) as refused:
        closed.retrieve("QR-B", None, tmp_path / "nothing")
    assert secret not in str(refused.value)
    status = env.dispatch_unreachable(closed, "closed", within=60)
    assert secret not in json.dumps(status)

    result = asyncio.run(retrieve(WEB_SOURCE, "QR-B", None, "outgoing", ["closed"]))
    case = Path(result["destination"])
    task_text = (case / "task.json").read_text()
    assert len(list(case.glob("*.dcm"))) == 2
    assert secret not in task_text
    assert env.task(case)["info"]["sender_address"] == peer.orthanc.dicomweb_url
    outcome = env.dispatch(case)
    assert secret not in json.dumps(outcome)
    assert secret not in (case / "task.json").read_text()


# ------------------------------------------------------------------------------- batches


def test_batch_with_an_unknown_accession_fails_at_the_check_step(
    env: DispatchEnv, peer: Peer, tmp_path: Path
) -> None:
    from flows.query import retrieve_batch

    env.save_target(peer.dicom_target(), SOURCE)
    dest = tmp_path / "dest"
    with pytest.raises(AccessionNotFound, match="QR-NOPE, QR-NADA"):
        asyncio.run(retrieve_batch(SOURCE, ["QR-B", "QR-NOPE", "QR-NADA"], None, str(dest), None))
    assert not dest.exists()


def test_batch_of_three_with_one_failure_then_retry(
    env: DispatchEnv, peer: Peer, runner: Path, tmp_path: Path
) -> None:
    from flows.query import retry_batch

    env.save_target(peer.dicom_target(), SOURCE)
    batch_id = run_batch(env, ["QR-B", "QR-C", "QR-D"], tmp_path)
    # Right after the check step (the retrievals start seconds later), one study disappears.
    blobs = take_away(peer.orthanc, peer.studies["QR-D"])
    try:
        status = wait_batch(batch_id, "Failed", 120)
        assert status.counts == {"Completed": 2, "Failed": 1}, status.as_dict()
        failed = next(c for c in status.children if c["state"] == "Failed")
        assert failed["accession"] == "QR-D"
        assert "No series found with accession number QR-D" in failed["message"]
        job = tmp_path / batch_id
        assert {p.name for p in job.iterdir()} == {"QR-B", "QR-C"}
        assert not (job / ".complete").exists()
        run_state = batch_run_state(batch_id)
        assert run_state.is_failed(), run_state  # a failed batch looks failed in the UI
        assert "QR-D" in (run_state.message or "")
    finally:
        put_back(peer.orthanc, blobs)

    assert cli("batch", "retry", batch_id) == 0
    wait_batch(batch_id, "Completed", 120)
    assert (job / ".complete").exists()
    assert batch_run_state(batch_id).is_completed()
    for accession in ("QR-B", "QR-C", "QR-D"):
        assert pixel_digests(job / accession) == expected(peer.studies[accession])
    assert asyncio.run(retry_batch(batch_id)) == 0  # nothing left to retry


def test_orthanc_stopped_mid_batch_then_retried(
    env: DispatchEnv, peer: Peer, runner: Path, tmp_path: Path
) -> None:
    env.save_target(peer.dicom_target(retrieve_method="move"), SOURCE)
    batch_id = run_batch(env, ["QR-A", "QR-B"], tmp_path)
    stop(peer.orthanc)  # after the check step, before the retrievals run
    try:
        status = wait_batch(batch_id, "Failed", 120)
        assert status.counts == {"Failed": 2}, status.as_dict()
        messages = " ".join(c["message"] for c in status.children)
        assert "cannot associate" in messages or "refused" in messages, messages
    finally:
        restart(peer.orthanc)
        allow_modality(peer.orthanc, OUR_AET, peer.move_port)
    assert cli("batch", "retry", batch_id) == 0
    wait_batch(batch_id, "Completed", 120)
    assert pixel_digests(tmp_path / batch_id / "QR-A") == expected(peer.studies["QR-A"])
    assert (tmp_path / batch_id / ".complete").exists()


def _next_minute(min_lead: float = 25.0) -> dt.datetime:
    now = dt.datetime.now()
    start = now.replace(second=0, microsecond=0) + dt.timedelta(minutes=1)
    if (start - now).total_seconds() < min_lead:
        start += dt.timedelta(minutes=1)
    return start


def test_offpeak_batch_paused_resumed_and_started_by_the_scheduler(
    env: DispatchEnv, peer: Peer, runner: Path, tmp_path: Path
) -> None:
    from prefect.client.orchestration import get_client
    from prefect.deployments import run_deployment

    window = _next_minute()
    env.save_settings(
        offpeak_start=window.strftime("%H:%M"),
        offpeak_end=(window + dt.timedelta(hours=1)).strftime("%H:%M"),
    )
    env.save_target(peer.dicom_target(), SOURCE)
    # The batch itself as a run of the retrieve-batch deployment, as the UI or the API start it.
    parent = run_deployment(
        "retrieve_batch/retrieve-batch",
        parameters={
            "target": SOURCE,
            "accessions": ["QR-B", "QR-C"],
            "destination": str(tmp_path),
            "offpeak": True,
        },
        timeout=60,
        poll_interval=0.5,
    )
    assert parent.state is not None
    assert parent.state.is_completed(), parent.state
    batch_id = str(parent.id)
    status = batch(batch_id)
    assert status.state == "Scheduled"
    starts = {dt.datetime.fromisoformat(c["scheduled"]) for c in status.children}
    assert starts == {window.astimezone()}, starts

    assert cli("batch", "pause", batch_id) == 0
    assert batch(batch_id).counts == {"Paused": 2}
    first, second = batch(batch_id).children

    # One child resumed as the UI does (Prefect's resume: scheduled now): it starts, sees it is
    # outside the window and puts itself back to the window start. The other by the CLI.
    async def ui_resume() -> None:
        async with get_client() as client:
            await client.resume_flow_run(first["flow_run"])

    asyncio.run(ui_resume())
    assert cli("batch", "resume", batch_id) == 0

    def back_to_the_window() -> bool:
        children = batch(batch_id).children
        return all(
            c["state"] != "Paused"
            and dt.datetime.fromisoformat(c["scheduled"]) >= window.astimezone()
            for c in children
        )

    wait_for(
        back_to_the_window,
        60,
        "both children to wait for the window",
        show=batch_status_of(batch_id),
    )
    if dt.datetime.now() < window - dt.timedelta(seconds=15):
        assert not list((tmp_path / batch_id).iterdir()), "nothing may run before the window"

    remaining = (window - dt.datetime.now()).total_seconds()
    wait_batch(batch_id, "Completed", remaining + 90)
    assert (tmp_path / batch_id / ".complete").exists()

    for accession in ("QR-B", "QR-C"):  # retrieved in the window (folder written then)
        assert (tmp_path / batch_id / accession).stat().st_mtime >= window.timestamp()
