"""S3 targets against ``moto_server`` (the S3 API over HTTP on 127.0.0.1, authentication on)."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from pydantic import SecretStr

from blocks.base import SendContext
from blocks.errors import PermanentTargetError
from blocks.s3 import S3Target, object_key
from tasks.taskjson import read_task
from tests.cases import make_case, nest_first_file
from tests.dispatch_env import DispatchEnv
from tests.peers.net import free_port
from tests.peers.s3 import REGION, MotoS3


@pytest.fixture(scope="module")
def moto(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MotoS3]:
    with MotoS3(tmp_path_factory.mktemp("moto")) as server:
        yield server


def bucket_name() -> str:
    return f"dispatch-{uuid.uuid4().hex[:12]}"


def s3_target(moto: MotoS3, bucket: str, **fields: object) -> S3Target:
    values: dict[str, object] = {
        "region": REGION,
        "bucket": bucket,
        "prefix": "mercure/in",
        "access_key_id": moto.access_key_id,
        "secret_access_key": moto.secret_access_key,
        "endpoint_url": moto.endpoint,
        **fields,
    }
    return S3Target.model_validate(values)


def test_every_dcm_arrives_under_prefix_task_id_file_name(env: DispatchEnv, moto: MotoS3) -> None:
    bucket = moto.create_bucket(bucket_name())
    target = s3_target(moto, bucket)
    assert target.test_connection() == {
        "S3 connection": True,
        "Bucket exists": True,
        "Credentials accepted": True,
        "err": "",
    }
    env.save_target(target, "archive")
    case = make_case(env.outgoing, ["archive"], files=4, rows=64, cols=64)
    nest_first_file(case)  # sub-folders are flattened, as mercure does
    (case / "extra.tags").write_text("not DICOM")
    expected = {f"mercure/in/{case.name}/{p.name}": p.read_bytes() for p in case.rglob("*.dcm")}

    result = env.dispatch(case)

    assert result["location"] == "success", result
    assert moto.objects(bucket) == expected, "only the .dcm files, byte for byte"
    done = env.success / case.name
    assert env.task(done)["dispatch"]["status"]["archive"]["state"] == "complete"


def test_key_format_and_colliding_names(tmp_path: Path, moto: MotoS3) -> None:
    assert object_key("", "task-1", "a.dcm") == "task-1/a.dcm"
    assert object_key("in/", "task-1", "a.dcm") == "in/task-1/a.dcm"
    case = make_case(tmp_path, ["t"], files=1)
    twin = case / "sub" / next(case.glob("*.dcm")).name
    twin.parent.mkdir()
    twin.write_bytes(next(case.glob("*.dcm")).read_bytes())
    _, task = read_task(case)
    target = s3_target(moto, "never-used-bucket")
    with pytest.raises(PermanentTargetError, match="would both be uploaded"):
        target.send(SendContext(case, task))


def test_endpoint_down_fails_quickly_and_keeps_the_case(env: DispatchEnv, moto: MotoS3) -> None:
    env.save_settings(retry_max=3, retry_delay=600.0)
    down = s3_target(moto, "some-bucket", endpoint_url=f"http://127.0.0.1:{free_port()}")
    status = env.dispatch_unreachable(down, "s3_down", within=20)
    assert "cannot connect to the endpoint" in status["message"]
    assert down.test_connection()["S3 connection"] is False


def test_wrong_secret_is_refused_without_leaking_it(env: DispatchEnv, moto: MotoS3) -> None:
    env.save_settings(retry_max=3, retry_delay=600.0)
    bucket = moto.create_bucket(bucket_name())
    secret = "wrong-secret-" + uuid.uuid4().hex
    target = s3_target(moto, bucket, secret_access_key=secret)
    env.save_target(target, "s3_badkey")
    case = make_case(env.outgoing, ["s3_badkey"])

    assert env.dispatch(case)["location"] == "outgoing"

    status = env.task(case)["dispatch"]["status"]["s3_badkey"]
    assert status["state"] == "error"
    assert "credentials refused (SignatureDoesNotMatch)" in status["message"]
    assert secret not in (case / "task.json").read_text()
    assert moto.objects(bucket) == {}
    tested = target.test_connection()
    assert tested["Credentials accepted"] is False
    assert not S3Target.connection_ok(tested)
    assert secret not in json.dumps(tested)


def test_retry_after_partial_delivery_sends_only_to_the_failed_target(
    env: DispatchEnv, moto: MotoS3
) -> None:
    env.save_settings(retry_max=3, retry_delay=0.0)
    kept = moto.create_bucket(bucket_name(), versioned=True)  # a re-upload adds a version
    later = bucket_name()  # does not exist yet
    env.save_target(s3_target(moto, kept), "s3_ok")
    env.save_target(s3_target(moto, later, prefix=""), "s3_later")
    case = make_case(env.outgoing, ["s3_ok", "s3_later"])

    assert env.dispatch(case)["location"] == "outgoing"
    status = env.task(case)["dispatch"]["status"]
    assert status["s3_ok"]["state"] == "complete"
    assert "the bucket does not exist" in status["s3_later"]["message"]
    moto.create_bucket(later)

    assert env.dispatch(case)["location"] == "success"
    names = sorted(p.name for p in (env.success / case.name).glob("*.dcm"))
    assert moto.versions(kept) == {f"mercure/in/{case.name}/{n}": 1 for n in names}
    assert sorted(moto.objects(later)) == [f"{case.name}/{n}" for n in names]


def test_mercure_json_s3_target_imports(env: DispatchEnv) -> None:
    spec = {
        "target_type": "s3",
        "region": "eu-central-1",
        "bucket": "mercure-archive",
        "prefix": "cases",
        "access_key_id": "AKIAEXAMPLE",
        "secret_access_key": "mercure-secret-key",
        "endpoint_url": "https://minio.example.org:9000",
        "contact": "",
        "comment": "",
        "direction": "push",
    }
    block = env.import_one_target("S3_Archive", spec)
    assert isinstance(block, S3Target)
    assert isinstance(block.secret_access_key, SecretStr)
    assert block.secret_access_key.get_secret_value() == "mercure-secret-key"
    assert "mercure-secret-key" not in repr(block)
    assert (block.bucket, block.prefix, block.endpoint_url) == (
        "mercure-archive",
        "cases",
        "https://minio.example.org:9000",
    )
