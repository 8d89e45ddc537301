"""mercure's S3 target: every ``*.dcm`` of the case uploaded as ``<prefix>/<task id>/<file name>``.

Exactly mercure's objects (reference §3.7): all ``*.dcm`` files found recursively, sub-folders
flattened into one key level, nothing else (no ``task.json``, no marker). Uploads go through
boto3's transfer manager: files are streamed from disk, large ones in multipart parts, several at
once. Every request has a connect and a read timeout and botocore's limited retries; an
``endpoint_url`` points the target at an S3-compatible store (MinIO, Ceph, ...).

Differences from mercure: two files with the same name in different sub-folders would get the
same key and one would silently replace the other; such a case is refused with a clear reason.
Each file is uploaded from a descriptor opened at send time without following a link: a link
planted in the case after the pre-send check fails the send, naming the file.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any, BinaryIO, ClassVar, Literal

from pydantic import Field, SecretStr

from blocks.base import DispatchTarget, SendContext, SendResult, ca_bundle_verify, dicom_files
from blocks.errors import PermanentTargetError, TargetError, TransientTargetError, one_line

if TYPE_CHECKING:
    from botocore.client import BaseClient

__all__ = ["S3Target", "object_key"]

DEFAULT_CONNECT_TIMEOUT = 10.0
DEFAULT_READ_TIMEOUT = 60.0
DEFAULT_MAX_ATTEMPTS = 3
DEFAULT_CONCURRENCY = 8
DEFAULT_PART_MB = 16
#: Error codes meaning the credentials themselves were refused (not just a missing permission).
_BAD_CREDENTIALS = frozenset(
    {"InvalidAccessKeyId", "SignatureDoesNotMatch", "InvalidToken", "ExpiredToken"}
)
_TRANSIENT_CODES = frozenset(
    {"SlowDown", "RequestTimeout", "InternalError", "ServiceUnavailable", "Throttling"}
)


def object_key(prefix: str, task_id: str, file_name: str) -> str:
    """mercure's key, ``(Path(prefix) / task_id / name).as_posix()``; no prefix, no leading part."""
    return (PurePosixPath(prefix) / task_id / file_name).as_posix()


class S3Target(DispatchTarget):
    """An S3 bucket (or S3-compatible store) that receives each case's DICOM files.

    Objects are ``<prefix>/<task id>/<file name>`` for every ``*.dcm`` file of the case, as
    mercure writes them. Field names are mercure's, so a mercure.json target imports one to one.
    """

    _block_type_name = "S3 Target"
    _block_type_slug = "s3-target"
    _description = "An S3 bucket that receives each case's DICOM files (mercure's S3 target)."
    target_type: ClassVar[str] = "s3"
    _example_document = "archive"

    region: str = Field(default="", description="AWS region of the bucket (e.g. eu-central-1).")
    bucket: str = Field(description="Bucket name.")
    prefix: str = Field(
        default="", description="Key prefix; objects are <prefix>/<task id>/<file name>."
    )
    access_key_id: str = Field(
        default="",
        description="Access key id (empty: boto3's usual credential chain, e.g. an instance role).",
    )
    secret_access_key: SecretStr = Field(
        default=SecretStr(""), description="Secret access key of access_key_id."
    )
    endpoint_url: str = Field(
        default="",
        description="Endpoint of an S3-compatible store (e.g. https://minio.example:9000); "
        "empty: AWS.",
    )
    addressing_style: Literal["auto", "path", "virtual"] = Field(
        default="auto",
        description="Bucket in the path or in the host name; auto: path with endpoint_url, "
        "else boto3's choice.",
    )
    connect_timeout: float = Field(
        default=DEFAULT_CONNECT_TIMEOUT, gt=0, description="TCP connect timeout, seconds."
    )
    read_timeout: float = Field(
        default=DEFAULT_READ_TIMEOUT, gt=0, description="Timeout waiting for a response, seconds."
    )
    max_attempts: int = Field(
        default=DEFAULT_MAX_ATTEMPTS,
        ge=1,
        le=10,
        description="Attempts per request (botocore's retries for throttling, 5xx, timeouts).",
    )
    max_concurrency: int = Field(
        default=DEFAULT_CONCURRENCY, ge=1, le=64, description="Uploads (and parts) in parallel."
    )
    multipart_chunk_mb: int = Field(
        default=DEFAULT_PART_MB,
        ge=5,
        le=512,
        description="Files larger than this (MB) are sent in multipart parts of this size.",
    )
    ca_bundle: str = Field(
        default="",
        description="CA certificates file (PEM) an https endpoint's certificate must chain to "
        "(empty: the HTTP client's default CA bundle). Certificates are always verified.",
    )

    def where(self) -> str:
        """``s3 bucket 'b' at <endpoint>`` for messages (never a credential)."""
        at = self.endpoint_url or (f"AWS {self.region}" if self.region else "AWS")
        return f"S3 target {self.target_name or self.bucket} (bucket {self.bucket!r} at {at})"

    def get_client(self) -> BaseClient:
        """A boto3 S3 client for this target: the one place the secret key is unwrapped."""
        import boto3
        from botocore.config import Config

        style = self.addressing_style
        if style == "auto" and self.endpoint_url:
            style = "path"
        config = Config(
            connect_timeout=self.connect_timeout,
            read_timeout=self.read_timeout,
            retries={"max_attempts": self.max_attempts, "mode": "standard"},
            s3={"addressing_style": style},
            max_pool_connections=max(10, self.max_concurrency),
        )
        session = boto3.session.Session()
        secret = self.secret_access_key.get_secret_value()
        client: BaseClient = session.client(
            "s3",
            region_name=self.region or None,
            endpoint_url=self.endpoint_url or None,
            aws_access_key_id=self.access_key_id or None,
            aws_secret_access_key=secret or None,
            config=config,
            verify=ca_bundle_verify(self.ca_bundle, self.where()),
        )
        return client

    def object_keys(self, context: SendContext) -> list[tuple[Path, str]]:
        """(file, key) for every ``*.dcm`` of the case; refuses keys that would collide."""
        pairs = [
            (p, object_key(self.prefix, context.task_id, p.name))
            for p in dicom_files(context.case_dir)
        ]
        seen: dict[str, Path] = {}
        for path, key in pairs:
            if key in seen:
                first = seen[key].relative_to(context.case_dir)
                raise PermanentTargetError(
                    f"{self.where()}: {first} and {path.relative_to(context.case_dir)} would both "
                    f"be uploaded as {key} (mercure flattens sub-folders)"
                )
            seen[key] = path
        return pairs

    def send(self, context: SendContext) -> SendResult:
        pairs = self.object_keys(context)
        if not pairs:
            raise PermanentTargetError(f"{self.where()}: the case has no *.dcm files")
        from boto3.s3.transfer import TransferConfig, create_transfer_manager

        part = self.multipart_chunk_mb * 1024 * 1024
        config = TransferConfig(
            multipart_threshold=part,
            multipart_chunksize=part,
            max_concurrency=self.max_concurrency,
            use_threads=True,
        )
        # Each file is uploaded from a descriptor opened now, without following a link; at
        # most twice as many are open as uploads run (a case may hold thousands of files).
        window = threading.BoundedSemaphore(2 * self.max_concurrency)
        size = 0
        with self._errors("upload"):
            client = self.get_client()
            with create_transfer_manager(client, config) as manager:
                futures = []
                for path, key in pairs:
                    window.acquire()
                    try:
                        source = self._open(context, path)
                    except BaseException:
                        window.release()
                        raise
                    size += os.fstat(source.fileno()).st_size
                    done = _closer(source, window)
                    futures.append(manager.upload(source, self.bucket, key, subscribers=[done]))
                for future in futures:
                    future.result()
        first = pairs[0][1].rsplit("/", 1)[0]
        return SendResult(
            files=len(pairs),
            bytes=size,
            detail=f"{len(pairs)} objects to s3://{self.bucket}/{first}/",
        )

    def _open(self, context: SendContext, path: Path) -> BinaryIO:
        """A case file, opened at send time without following a link (a link is refused)."""
        try:
            return context.files.open(path)
        except OSError as exc:
            rel = path.relative_to(context.case_dir)
            raise PermanentTargetError(
                f"{self.where()}: cannot read {rel}: {exc.strerror or exc}"
            ) from None

    def test_connection(self) -> dict[str, Any]:
        """mercure's keys ``S3 connection`` and ``Bucket exists``, plus ``Credentials accepted``.

        mercure reports any refusal other than 404 as "bucket exists", so wrong keys looked
        usable; here a refused HEAD is followed by a listing, whose error code tells refused
        credentials (``Credentials accepted`` false) from a key that may upload but not list
        (true). ``err`` says what went wrong, or is empty.
        """
        from botocore.exceptions import ClientError

        result: dict[str, Any] = {
            "S3 connection": False,
            "Bucket exists": False,
            "Credentials accepted": None,
            "err": "",
        }
        try:
            client = self.get_client()
            client.head_bucket(Bucket=self.bucket)
            result.update({"S3 connection": True, "Bucket exists": True})
            result["Credentials accepted"] = True
        except ClientError as exc:
            result["S3 connection"] = True
            code = _error_code(exc)
            result["Bucket exists"] = code not in ("404", "NoSuchBucket")
            if code in ("404", "NoSuchBucket"):
                result["Credentials accepted"] = True
                result["err"] = f"bucket {self.bucket!r} does not exist"
            else:
                code, message = self._probe_listing(client)
                result["Credentials accepted"] = code not in _BAD_CREDENTIALS
                result["err"] = f"{code}: {message}" if code else ""
        except Exception as exc:
            result["err"] = one_line(exc, 300)
        return result

    def _probe_listing(self, client: BaseClient) -> tuple[str, str]:
        """The error code and message of a one-key listing ("" if it works)."""
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            client.list_objects_v2(Bucket=self.bucket, MaxKeys=1)
        except ClientError as exc:
            return _error_code(exc), _error_message(exc)
        except BotoCoreError as exc:
            return type(exc).__name__, one_line(exc, 300)
        return "", ""

    @contextmanager
    def _errors(self, action: str) -> Iterator[None]:
        """Translate boto3/botocore/OS errors into TargetErrors (the block's one boundary)."""
        from botocore.exceptions import (
            BotoCoreError,
            ClientError,
            ConnectTimeoutError,
            HTTPClientError,
            NoCredentialsError,
            PartialCredentialsError,
            ReadTimeoutError,
        )
        from botocore.exceptions import ConnectionError as BotoConnectionError

        where = self.where()
        try:
            yield
        except TargetError:
            raise
        except ClientError as exc:
            code, message = _error_code(exc), _error_message(exc)
            status = int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0)
            if code in _BAD_CREDENTIALS:
                raise PermanentTargetError(
                    f"{where}: credentials refused ({code}): check access_key_id and "
                    "secret_access_key"
                ) from None
            if code in ("AccessDenied", "403") or status == 403:
                raise PermanentTargetError(
                    f"{where}: access denied ({code}) to {action}: check the key's permissions"
                ) from None
            if code in ("NoSuchBucket", "404"):
                raise PermanentTargetError(f"{where}: the bucket does not exist") from None
            kind = TransientTargetError if (status >= 500 or code in _TRANSIENT_CODES) else None
            raise (kind or PermanentTargetError)(
                f"{where}: {action} failed: {code}: {message}"
            ) from None
        except (NoCredentialsError, PartialCredentialsError) as exc:
            raise PermanentTargetError(f"{where}: no usable credentials: {exc}") from None
        except ConnectTimeoutError:
            raise TransientTargetError(
                f"{where}: no connection within {self.connect_timeout:g} s"
            ) from None
        except ReadTimeoutError:
            raise TransientTargetError(
                f"{where}: no response within {self.read_timeout:g} s"
            ) from None
        except (BotoConnectionError, HTTPClientError) as exc:
            raise TransientTargetError(
                f"{where}: cannot connect to the endpoint ({type(exc).__name__})"
            ) from None
        except BotoCoreError as exc:
            raise TransientTargetError(f"{where}: {action} failed: {one_line(exc, 300)}") from None
        except OSError as exc:
            raise PermanentTargetError(
                f"{where}: cannot read {getattr(exc, 'filename', '') or 'a file'}: "
                f"{exc.strerror or exc}"
            ) from None


def _closer(source: BinaryIO, window: threading.BoundedSemaphore) -> Any:
    """An s3transfer subscriber that closes ``source`` and frees its slot once its upload ended."""
    from s3transfer.subscribers import BaseSubscriber

    class _Closer(BaseSubscriber):  # type: ignore[misc]
        def on_done(self, future: Any, **kwargs: Any) -> None:
            source.close()
            window.release()

    return _Closer()


def _error_code(exc: Any) -> str:
    return str(exc.response.get("Error", {}).get("Code", "") or "")


def _error_message(exc: Any) -> str:
    return one_line(exc.response.get("Error", {}).get("Message", "") or exc, 300)
