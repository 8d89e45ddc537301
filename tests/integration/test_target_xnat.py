"""XNAT targets against a stand-in XNAT (tests/peers/xnat_fake.py): no real XNAT runs here."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from pydantic import SecretStr
from pydicom import dcmread

from blocks.base import SendContext, dicom_files
from blocks.errors import PermanentTargetError
from blocks.xnat import XnatTarget
from tasks.taskjson import read_task
from tests.cases import make_case, nest_first_file
from tests.dispatch_env import DispatchEnv
from tests.peers.net import free_port
from tests.peers.xnat_fake import XnatFake


@pytest.fixture
def xnat(tmp_path: Path) -> Iterator[XnatFake]:
    with XnatFake(tmp_path / "xnat") as fake:
        yield fake


def xnat_target(fake: XnatFake, **fields: object) -> XnatTarget:
    values: dict[str, object] = {
        "project_id": "RESEARCH",
        "host": fake.url,
        "user": fake.user,
        "password": fake.password,
        **fields,
    }
    return XnatTarget.model_validate(values)


def test_case_arrives_as_one_zip_with_mercures_parameters(env: DispatchEnv, xnat: XnatFake) -> None:
    target = xnat_target(xnat, overwrite="delete")  # mercure's behaviour, now explicit
    assert target.test_connection() == {"ping": True, "loggedin": True, "err": ""}
    env.save_target(target, "xnat")
    case = make_case(env.outgoing, ["xnat"], files=4)
    nest_first_file(case)  # zipped too: mercure zips recursively
    files = dicom_files(case)
    expected = {f"{n}.dcm": path.read_bytes() for n, path in enumerate(files)}
    xnat.requests.clear()

    result = env.dispatch(case)

    assert result["location"] == "success", result
    assert len(xnat.uploads) == 1
    upload = xnat.uploads[0]
    assert upload.params == {
        "PROJECT_ID": "RESEARCH",
        "SUBJECT_ID": "MRN0001",
        "EXPT_LABEL": "MRN0001_2026-01-01",
        "rename": "true",
        "overwrite": "delete",
        "inbody": "true",
    }
    assert upload.content_type == "application/zip"
    assert upload.user == xnat.user
    assert upload.members() == expected
    assert xnat.requests == [
        ("POST", "/data/services/import"),
        ("GET", "/data/JSESSION"),
        ("DELETE", "/data/JSESSION"),
    ], "one upload, then pyxnat's disconnect"
    assert env.task(env.success / case.name)["dispatch"]["status"]["xnat"]["state"] == "complete"


def test_a_second_study_with_the_same_label_deletes_nothing(
    env: DispatchEnv, xnat: XnatFake
) -> None:
    """Same patient, same day: mercure's label clashes. The first session stays whole, the
    second case fails with the reason; a re-send of the first (after a crash) is sent."""
    env.save_settings(retry_max=1, retry_delay=0.0)
    env.save_target(xnat_target(xnat), "xnat")
    first = make_case(env.outgoing, ["xnat"], files=3)
    _, task = read_task(first)
    assert env.dispatch(first)["location"] == "success"
    stored = dict(xnat.sessions)
    [upload] = xnat.uploads
    assert upload.params["overwrite"] == "none"

    again = xnat_target(xnat).send(SendContext(env.success / first.name, task))
    assert "not sent again" in again.detail
    assert len(xnat.uploads) == 1, "a session with the case's instances is the case, sent"

    second = make_case(env.outgoing, ["xnat"], files=2)
    result = env.dispatch(second)

    assert result["location"] == "error"
    assert "already exists and is another study" in result["reason"]
    assert "3 instance(s), this case 2, 0 in common" in result["reason"]
    assert len(xnat.uploads) == 1
    assert xnat.deleted == 0
    assert xnat.sessions == stored, "the first study's session is unchanged"
    assert ("DELETE", "/data/services/import") not in xnat.requests


def test_server_down_or_failing_keeps_the_case_with_reasons(
    env: DispatchEnv, xnat: XnatFake
) -> None:
    env.save_settings(retry_max=3, retry_delay=600.0)
    xnat.import_status = 500
    env.save_target(xnat_target(xnat, host=f"http://127.0.0.1:{free_port()}"), "xnat_down")
    env.save_target(xnat_target(xnat), "xnat_broken")
    case = make_case(env.outgoing, ["xnat_down", "xnat_broken"])
    started = time.monotonic()
    result = env.dispatch(case)
    assert time.monotonic() - started < 20
    assert result["location"] == "outgoing"
    assert len(list(case.glob("*.dcm"))) == 3, "nothing is lost"
    status = env.task(case)["dispatch"]["status"]
    assert status["xnat_down"]["state"] == "error"
    assert "cannot connect" in status["xnat_down"]["message"]
    assert status["xnat_broken"]["state"] == "error"
    assert "the import failed (HTTP 500)" in status["xnat_broken"]["message"]
    assert xnat.uploads == []


def test_wrong_password_is_refused_without_leaking_it(env: DispatchEnv, xnat: XnatFake) -> None:
    env.save_settings(retry_max=3, retry_delay=600.0)
    secret = "not-the-password-4711"
    target = xnat_target(xnat, password=secret)
    env.save_target(target, "xnat_badpw")
    case = make_case(env.outgoing, ["xnat_badpw"])

    assert env.dispatch(case)["location"] == "outgoing"

    message = env.task(case)["dispatch"]["status"]["xnat_badpw"]["message"]
    assert "refused the credentials (HTTP 401)" in message
    assert secret not in (case / "task.json").read_text()
    assert xnat.uploads == []
    tested = target.test_connection()
    assert tested["loggedin"] is False
    assert "401" in tested["err"]
    assert not XnatTarget.connection_ok(tested)


def test_retry_after_partial_delivery_sends_only_to_the_failed_target(
    env: DispatchEnv, xnat: XnatFake
) -> None:
    env.save_settings(retry_max=3, retry_delay=0.0)
    env.save_target(xnat_target(xnat, project_id="PROJ_A"), "xnat_ok")
    env.save_target(xnat_target(xnat, project_id="PROJ_B", password="wrong"), "xnat_later")
    case = make_case(env.outgoing, ["xnat_ok", "xnat_later"])

    assert env.dispatch(case)["location"] == "outgoing"
    assert [u.params["PROJECT_ID"] for u in xnat.uploads] == ["PROJ_A"]
    env.save_target(xnat_target(xnat, project_id="PROJ_B"), "xnat_later")  # password fixed

    assert env.dispatch(case)["location"] == "success"
    assert [u.params["PROJECT_ID"] for u in xnat.uploads] == ["PROJ_A", "PROJ_B"]


def test_missing_study_date_is_a_permanent_clear_error(tmp_path: Path, xnat: XnatFake) -> None:
    case = make_case(tmp_path, ["t"], files=2)
    for path in case.glob("*.dcm"):
        ds = dcmread(path)
        del ds.StudyDate
        ds.save_as(path)
    _, task = read_task(case)
    with pytest.raises(PermanentTargetError, match="no valid StudyDate"):
        xnat_target(xnat).send(SendContext(case, task))
    assert xnat.requests == []


def test_mercure_json_xnat_target_imports(env: DispatchEnv) -> None:
    spec = {
        "target_type": "xnat",
        "project_id": "RESEARCH",
        "host": "https://xnat.example.org",
        "user": "mercure",
        "password": "xnat-secret",
        "contact": "",
        "comment": "",
        "direction": "push",
    }
    block = env.import_one_target("XNAT_Research", spec)
    assert isinstance(block, XnatTarget)
    assert isinstance(block.password, SecretStr)
    assert block.password.get_secret_value() == "xnat-secret"
    assert (block.project_id, block.host, block.user) == (
        "RESEARCH",
        "https://xnat.example.org",
        "mercure",
    )
