"""A real S3 API on 127.0.0.1: ``moto_server`` with IAM authentication switched on.

moto accepts any key pair unless authentication is on; here the fixture makes one IAM user with
an access key allowed ``s3:*``, then turns authentication on (``/moto-api/reset-auth``), so a
wrong secret is refused with ``SignatureDoesNotMatch`` as AWS would. Nothing leaves the machine:
every client gets the loopback ``endpoint_url`` and the instance-metadata lookup is disabled.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import urllib.request
from pathlib import Path
from typing import Any

from tests.peers.base import Peer, missing
from tests.peers.net import free_port, stop_process, wait_for_port

__all__ = ["MotoS3"]

REGION = "us-east-1"
_ALLOW_S3 = {
    "Version": "2012-10-17",
    "Statement": [{"Effect": "Allow", "Action": "s3:*", "Resource": "*"}],
}


def _moto_server() -> str:
    binary = Path(sys.prefix) / "bin" / "moto_server"
    if binary.is_file():
        return str(binary)
    missing("moto_server not found (pip install 'moto[server]')")


class MotoS3(Peer):
    """``moto_server`` on a free loopback port, started and always killed by ``with``.

    ``access_key_id``/``secret_access_key`` are the only accepted credentials once it runs.
    """

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.port = 0
        self.access_key_id = ""
        self.secret_access_key = ""
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> MotoS3:
        self.workdir.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, "AWS_EC2_METADATA_DISABLED": "true"}
        log = (self.workdir / "moto.log").open("ab")
        self.port = free_port()
        self._proc = subprocess.Popen(
            [_moto_server(), "-H", "127.0.0.1", "-p", str(self.port)],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        log.close()
        try:
            wait_for_port(self.port, timeout=30, proc=self._proc)
            self._make_user()
            self._post("/moto-api/reset-auth", b"0")  # authentication on from now on
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        stop_process(self._proc, grace=0)

    def _post(self, path: str, body: bytes) -> dict[str, Any]:
        request = urllib.request.Request(
            self.endpoint + path,
            data=body,
            method="POST",
            headers={"Content-Type": "application/octet-stream"},  # form types hide the body
        )
        with urllib.request.urlopen(request, timeout=10) as response:
            return dict(json.loads(response.read() or b"{}"))

    def _make_user(self) -> None:
        iam = self._client("iam", "AKIAANYTHING", "anything")
        iam.create_user(UserName="dispatcher")
        iam.put_user_policy(
            UserName="dispatcher", PolicyName="s3", PolicyDocument=json.dumps(_ALLOW_S3)
        )
        key = iam.create_access_key(UserName="dispatcher")["AccessKey"]
        self.access_key_id = key["AccessKeyId"]
        self.secret_access_key = key["SecretAccessKey"]

    def _client(self, service: str, key_id: str, secret: str) -> Any:
        import boto3
        from botocore.config import Config

        return boto3.session.Session().client(
            service,
            region_name=REGION,
            endpoint_url=self.endpoint,
            aws_access_key_id=key_id,
            aws_secret_access_key=secret,
            config=Config(connect_timeout=5, read_timeout=30, retries={"max_attempts": 1}),
        )

    def client(self) -> Any:
        """An S3 client with the valid credentials (for setting up and checking buckets)."""
        return self._client("s3", self.access_key_id, self.secret_access_key)

    def create_bucket(self, name: str, *, versioned: bool = False) -> str:
        s3 = self.client()
        s3.create_bucket(Bucket=name)
        if versioned:
            s3.put_bucket_versioning(Bucket=name, VersioningConfiguration={"Status": "Enabled"})
        return name

    def objects(self, bucket: str) -> dict[str, bytes]:
        """Key -> content of every object in ``bucket``."""
        s3 = self.client()
        out: dict[str, bytes] = {}
        for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket):
            for item in page.get("Contents", []):
                out[item["Key"]] = s3.get_object(Bucket=bucket, Key=item["Key"])["Body"].read()
        return out

    def versions(self, bucket: str) -> dict[str, int]:
        """Key -> number of stored versions (uploads) in a versioned bucket."""
        counts: dict[str, int] = {}
        listing = self.client().list_object_versions(Bucket=bucket)
        for version in listing.get("Versions", []):
            counts[version["Key"]] = counts.get(version["Key"], 0) + 1
        return counts
