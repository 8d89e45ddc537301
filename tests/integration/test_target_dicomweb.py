"""DICOMweb targets: STOW-RS to a real Orthanc (with and without basic auth), a recording STOW-RS
server for bearer tokens and request counts, ``file://`` folders, and mercure.json import."""

from __future__ import annotations

import asyncio
import json
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from blocks.base import SendContext
from blocks.dicomweb import DicomWebTarget
from blocks.errors import PermanentTargetError, TransientTargetError
from tests.cases import make_case
from tests.dicomfiles import pixel_digest, pixel_digests, received_digests
from tests.dispatch_env import DispatchEnv
from tests.peers.net import free_port
from tests.peers.orthanc import Orthanc, StowRecorder

USER, PASSWORD = "alice", "wonderland-pw-4711"
TOKEN = "tok-secret-0815"


@pytest.fixture(scope="module")
def orthanc(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Orthanc]:
    with Orthanc(tmp_path_factory.mktemp("orthanc"), dicom_server=False) as peer:
        yield peer


@pytest.fixture(scope="module")
def orthanc_auth(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Orthanc]:
    folder = tmp_path_factory.mktemp("orthanc-auth")
    with Orthanc(folder, users={USER: PASSWORD}, dicom_server=False) as peer:
        yield peer


def stored_digests(peer: Orthanc, folder: Path) -> dict[str, str]:
    return received_digests(peer.download(folder))


def test_case_arrives_at_orthanc_byte_identical_in_batches(
    env: DispatchEnv, orthanc: Orthanc, tmp_path: Path
) -> None:
    env.save_target(DicomWebTarget(url=orthanc.dicomweb_url, stow_batch_files=4), "web_pacs")
    case = make_case(env.outgoing, ["web_pacs"], files=10, rows=64, cols=64)
    sent = pixel_digests(case)

    result = env.dispatch(case)

    assert result["location"] == "success", result
    assert result["targets"]["web_pacs"]["extra"]["requests"] == 3  # 4 + 4 + 2
    stored = stored_digests(orthanc, tmp_path / "stored")
    assert {uid: stored[uid] for uid in sent} == sent
    done = env.task(env.success / case.name)
    assert done["dispatch"]["status"]["web_pacs"]["state"] == "complete"
    assert DicomWebTarget(url=orthanc.dicomweb_url).test_connection() == {
        "Authentication": True,
        "QIDO query": True,
    }


def test_basic_auth_accepted_and_bad_credentials_reported(
    env: DispatchEnv, orthanc_auth: Orthanc
) -> None:
    url = orthanc_auth.dicomweb_url
    good = DicomWebTarget(url=url, http_user=USER, http_password=PASSWORD)
    env.save_target(good, "secure_pacs")
    case = make_case(env.outgoing, ["secure_pacs"], files=3)
    uids = set(pixel_digests(case))
    assert env.dispatch(case)["location"] == "success"
    assert uids <= set(orthanc_auth.instances())
    assert good.test_connection() == {"Authentication": True, "QIDO query": True}

    env.save_settings(retry_max=1)
    env.save_target(DicomWebTarget(url=url, http_user=USER, http_password="wrong"), "secure_pacs")
    rejected = make_case(env.outgoing, ["secure_pacs"], files=2)
    started = time.monotonic()
    result = env.dispatch(rejected)
    assert result["location"] == "error"
    assert time.monotonic() - started < 10, "a permanent error is not retried within the attempt"
    message = env.task(env.error / rejected.name)["dispatch"]["status"]["secure_pacs"]["message"]
    assert "HTTP 401" in message
    assert "refused the credentials" in message
    assert url in message
    bad = DicomWebTarget(url=url, http_user=USER, http_password="wrong").test_connection()
    assert bad["Authentication"] is False, "mercure reported a 401 as authenticated"
    assert bad["QIDO query"] is False
    anonymous = DicomWebTarget(url=url).test_connection()
    assert "none are configured" in anonymous["Reason"]
    everything = json.dumps(result) + (env.error / rejected.name / "task.json").read_text()
    assert PASSWORD not in everything


def test_bearer_token_sent_and_batches_bounded_by_bytes(env: DispatchEnv) -> None:
    with StowRecorder(token=TOKEN) as peer:
        target = DicomWebTarget(
            url=peer.url, stow_url_prefix="/stow/", access_token=TOKEN, stow_batch_bytes=20_000
        )
        env.save_target(target, "token_pacs")
        case = make_case(env.outgoing, ["token_pacs"], files=5, rows=64, cols=64)  # ≈ 9 KB each
        uids = set(pixel_digests(case))
        assert env.dispatch(case)["location"] == "success"
        assert peer.received() == uids
        assert len(peer.requests) == 3  # 2 + 2 + 1 files of ≈ 9 KB under 20 000 bytes
        for request in peer.requests:
            assert request.path == "/stow/studies"
            assert request.headers["Authorization"] == f"Bearer {TOKEN}"
            assert request.headers["Content-Type"].startswith(
                'multipart/related; type="application/dicom"'
            )
            assert not request.chunked
            assert int(request.headers["Content-Length"]) > 0
        assert target.test_connection() == {"Authentication": True, "QIDO query": True}

        wrong = DicomWebTarget(url=peer.url, access_token="not-the-token")
        with pytest.raises(PermanentTargetError, match="HTTP 401.*refused the credentials") as err:
            wrong.send(_context(make_case(env.outgoing, ["x"], files=1)))
        assert "not-the-token" not in str(err.value)
        assert wrong.test_connection()["Authentication"] is False


def test_peer_down_is_quick_transient_and_the_case_is_kept(env: DispatchEnv) -> None:
    url = f"http://127.0.0.1:{free_port()}/dicom-web"
    env.save_target(DicomWebTarget(url=url, connect_timeout=2), "down_pacs")
    case = make_case(env.outgoing, ["down_pacs"])
    started = time.monotonic()
    result = env.dispatch(case)
    assert time.monotonic() - started < 15
    assert result["location"] == "outgoing"
    status = env.task(case)["dispatch"]["status"]["down_pacs"]
    assert status["state"] == "error"
    assert "connection failed" in status["message"]
    assert url in status["message"]
    assert len(list(case.glob("*.dcm"))) == 3, "nothing is lost"
    test = DicomWebTarget(url=url).test_connection()
    assert test["QIDO query"] is False
    assert "connection failed" in test["Reason"]
    assert not DicomWebTarget.connection_ok(test)


def test_a_peer_that_never_answers_times_out_as_transient(tmp_path: Path) -> None:
    case = make_case(tmp_path, ["mute"], files=1)
    with socket.socket() as mute:  # accepts connections (backlog), never reads or answers
        mute.bind(("127.0.0.1", 0))
        mute.listen(4)
        target = DicomWebTarget(
            url=f"http://127.0.0.1:{mute.getsockname()[1]}", target_name="mute", read_timeout=0.5
        )
        started = time.monotonic()
        with pytest.raises(TransientTargetError, match=r"timed out \((read|write)\) after 0.5 s"):
            target.send(_context(case))
    assert time.monotonic() - started < 5


def test_retry_after_partial_delivery_sends_only_to_the_failed_target(
    env: DispatchEnv, orthanc: Orthanc
) -> None:
    """One target takes the case, the other is down: the retry goes to the second one only."""
    with StowRecorder() as first:
        env.save_target(DicomWebTarget(url=first.url), "first")
        env.save_target(DicomWebTarget(url=f"http://127.0.0.1:{free_port()}"), "second")
        case = make_case(env.outgoing, ["first", "second"], files=3)
        uids = set(pixel_digests(case))

        assert env.dispatch(case)["location"] == "outgoing"
        status = env.task(case)["dispatch"]["status"]
        assert status["first"]["state"] == "complete"
        assert status["second"]["state"] == "error"
        assert len(first.requests) == 1

        env.save_target(DicomWebTarget(url=orthanc.dicomweb_url), "second")  # the peer is back
        assert env.dispatch(case)["location"] == "success"
        assert len(first.requests) == 1, "the complete target was sent again"
    assert uids <= set(orthanc.instances())


def test_file_url_stores_into_the_folder(env: DispatchEnv, tmp_path: Path) -> None:
    archive = tmp_path / "archive"
    archive.mkdir()
    target = DicomWebTarget(url=f"file://{archive}", stow_batch_files=2)
    env.save_target(target, "local_web")
    case = make_case(env.outgoing, ["local_web"], files=3, rows=64, cols=64)
    sent = pixel_digests(case)

    assert env.dispatch(case)["location"] == "success"

    stored = [p for p in archive.glob("studies/*/series/*/instances/*") if p.is_file()]
    assert {p.name for p in stored} == set(sent)
    assert dict(map(pixel_digest, stored)) == sent
    assert target.test_connection() == {"Authentication": True, "QIDO query": True}
    missing = DicomWebTarget(url=f"file://{tmp_path / 'nope'}").test_connection()
    assert missing["Authentication"] == f"No such folder {tmp_path / 'nope'}"
    assert not DicomWebTarget.connection_ok(missing)


def test_import_config_maps_a_mercure_dicomweb_target(env: DispatchEnv, tmp_path: Path) -> None:
    from blocks.registry import aload_target, forget_cached_targets
    from deployments.importer import import_mercure_config

    mercure = {
        "targets": {
            "Web_PACS": {
                "target_type": "dicomweb",
                "url": "https://pacs.example/dicom-web",
                "qido_url_prefix": None,
                "wado_url_prefix": "wado",
                "stow_url_prefix": "stow",
                "access_token": None,
                "http_user": "mercure",
                "http_password": PASSWORD,
                "contact": "",
                "comment": "main archive",
                "direction": "both",
            },
            "Web_Folder": {"target_type": "dicomweb", "url": f"file://{tmp_path}"},
        }
    }
    path = tmp_path / "mercure.json"
    path.write_text(json.dumps(mercure))

    report = asyncio.run(import_mercure_config(path))

    assert report.imported == {"Web_PACS": "dicomweb", "Web_Folder": "dicomweb"}
    assert not report.ignored_fields
    forget_cached_targets()
    block = asyncio.run(aload_target("Web_PACS"))
    assert isinstance(block, DicomWebTarget)
    assert block.service_url("stow") == "https://pacs.example/dicom-web/stow"
    assert block.service_url("qido") == "https://pacs.example/dicom-web"
    assert block.http_password is not None
    assert block.http_password.get_secret_value() == PASSWORD
    assert block.direction == "both"
    assert block.stow_batch_files == 50
    assert PASSWORD not in json.dumps(report.as_dict()) + repr(block)


# -- the STOW core, without network or Prefect ----------------------------------------------


def _context(case: Path) -> SendContext:
    from tasks.taskjson import read_task

    return SendContext(case, read_task(case)[1])
