"""mercure's SFTP target, sent with paramiko, and the SSH settings it shares with rsync.

(Over 400 lines because the SSH base, host-key policy included, lives with its first user;
``blocks/rsync.py`` builds on it.)

Remote layout as mercure's: ``<folder>/<case folder name>/`` with every file of the case and an
empty ``.complete`` written last. Fixes over mercure (architecture §4.1):

- the host key is checked against a known-hosts file (mercure: ``accept-new``); an unknown key is
  a clear error telling how to fix it, unless ``trust_on_first_use`` is set, which records it;
- each file is streamed to a hidden ``.<name>.dicom-dispatch-part`` and renamed into place, so a
  file never appears half-written under its name; a retry re-uses the existing remote folder
  (mercure's ``mkdir`` failed), skips files that already arrived whole (same size and time, as
  rsync's quick check) and writes ``.complete`` only when every file is in place;
- the claim marker and our temporary files are never sent; ``file_filter`` is trimmed;
- each file is sent from a descriptor opened without following a link at send time: a link
  planted in the case after the pre-send check fails the send, naming the file.
"""

from __future__ import annotations

import io
import os
import posixpath
import socket
import stat
from abc import ABC
from collections.abc import Iterator
from contextlib import closing, contextmanager
from pathlib import Path
from typing import Any, BinaryIO, ClassVar

import paramiko
from pydantic import Field, SecretStr, field_validator

from blocks._net import tcp_reachable
from blocks.base import DispatchTarget, SendContext, SendResult
from blocks.errors import PermanentTargetError, TargetError, TransientTargetError
from blocks.folder import case_files

__all__ = ["SftpTarget", "SshTarget", "case_files"]

DEFAULT_SSH_PORT = 22
DEFAULT_KNOWN_HOSTS = "~/.ssh/known_hosts"
DEFAULT_CONNECT_TIMEOUT = 10.0
DEFAULT_IO_TIMEOUT = 60.0
#: The keys ssh tries when none is configured, in OpenSSH's order.
DEFAULT_KEY_NAMES = ("id_rsa", "id_ecdsa", "id_ed25519")
PART_SUFFIX = ".dicom-dispatch-part"
COMPLETE_MARKER = ".complete"


def expand_home(path: str) -> Path:
    """``~`` taken from ``HOME`` (OpenSSH would take it from the passwd entry instead)."""
    return Path(os.path.expanduser(path))


def host_key_name(host: str, port: int) -> str:
    """How known_hosts names a host: ``host``, or ``[host]:port`` off port 22."""
    return host if port == DEFAULT_SSH_PORT else f"[{host}]:{port}"


class SshTarget(DispatchTarget, ABC):
    """What the SFTP and rsync targets share: mercure's fields plus port, key and host keys."""

    folder: str = Field(description="Remote folder that receives one sub-folder per case.")
    user: str = Field(description="SSH user name.")
    host: str = Field(description="SSH server host name or IP address.")
    password: SecretStr | None = Field(
        default=None, description="SSH password (empty: key authentication only)."
    )
    file_filter: str | None = Field(
        default=None,
        description="Comma-separated glob patterns of files not to send (e.g. *.tags,task.json).",
    )
    port: int = Field(default=DEFAULT_SSH_PORT, ge=1, le=65535, description="SSH port (22).")
    key_file: str | None = Field(
        default=None,
        description="Private key file (empty: ~/.ssh/id_rsa, id_ecdsa, id_ed25519; ~ is $HOME).",
    )
    known_hosts_file: str = Field(
        default=DEFAULT_KNOWN_HOSTS,
        description="known_hosts file the server's host key is checked against (~ is $HOME).",
    )
    trust_on_first_use: bool = Field(
        default=False,
        description="Accept and record an unknown host key on first contact (mercure's habit).",
    )
    connect_timeout: float = Field(
        default=DEFAULT_CONNECT_TIMEOUT,
        gt=0,
        description="Seconds to connect and log in.",
    )
    io_timeout: float = Field(
        default=DEFAULT_IO_TIMEOUT,
        gt=0,
        description="Seconds without progress before a transfer is given up.",
    )

    @field_validator("password", mode="before")
    @classmethod
    def _empty_password_is_none(cls, value: Any) -> Any:
        """mercure stores "no password" as an empty string."""
        if isinstance(value, SecretStr):
            return value if value.get_secret_value() else None
        return value or None

    def known_hosts_path(self) -> Path:
        return expand_home(self.known_hosts_file or DEFAULT_KNOWN_HOSTS)

    def key_paths(self) -> list[Path]:
        """The configured key, or the default keys that exist in ``$HOME/.ssh``."""
        if self.key_file:
            return [expand_home(self.key_file)]
        home = expand_home("~/.ssh")
        return [home / name for name in DEFAULT_KEY_NAMES if (home / name).is_file()]

    def where(self) -> str:
        """Target and peer for messages (never a secret)."""
        name = self.target_name or "(unsaved)"
        return f"{self.target_type} target {name} ({self.user}@{self.host}:{self.port})"

    def remote_case_dir(self, context: SendContext) -> str:
        return posixpath.join(self.folder, context.case_dir.name)

    def unknown_host_key_hint(self) -> str:
        """How to fix an unknown host key (architecture §4.1: ``targets test`` says so)."""
        return (
            f"check the server's key fingerprint, then add it with "
            f"'ssh-keyscan -p {self.port} {self.host} >> {self.known_hosts_path()}', "
            f"or set trust_on_first_use"
        )

    def changed_host_key_hint(self) -> str:
        return (
            f"the host key of {host_key_name(self.host, self.port)} differs from the one in "
            f"{self.known_hosts_path()} (a re-installed server, or someone in between): "
            f"if the change is expected, remove the old line "
            f'(\'ssh-keygen -R "{host_key_name(self.host, self.port)}" -f '
            f"{self.known_hosts_path()}') and add the new key"
        )


class _UnknownHostKeyError(Exception):
    pass


class _KnownHostsPolicy(paramiko.MissingHostKeyPolicy):
    """Refuse a host that is not in the known-hosts file, or record it (trust on first use)."""

    def __init__(self, target: SshTarget) -> None:
        self._target = target

    def missing_host_key(
        self, client: paramiko.SSHClient, hostname: str, key: paramiko.PKey
    ) -> None:
        known_hosts = self._target.known_hosts_path()
        if not self._target.trust_on_first_use:
            raise _UnknownHostKeyError(
                f"host key {key.get_name()} {key.fingerprint} of {hostname} is not in "
                f"{known_hosts}: {self._target.unknown_host_key_hint()}"
            )
        known_hosts.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        with known_hosts.open("a", encoding="utf-8") as file:
            file.write(f"{hostname} {key.get_name()} {key.get_base64()}\n")
        client.get_host_keys().add(hostname, key.get_name(), key)
        self._target.logger.warning(
            "%s: trusted and recorded new host key %s in %s",
            self._target.where(),
            key.fingerprint,
            known_hosts,
        )


class SftpTarget(SshTarget):
    """An SFTP server that receives each case as ``<folder>/<case>/`` plus ``.complete``.

    Authenticates with a key (``key_file``, or the user's usual keys) or ``password``; the
    server's host key must be in ``known_hosts_file`` unless ``trust_on_first_use`` is set.
    Files are streamed, never read whole into memory.
    """

    _block_type_name = "SFTP Target"
    _block_type_slug = "sftp-target"
    _description = "mercure's SFTP target: uploads each case folder over SFTP (paramiko)."
    target_type: ClassVar[str] = "sftp"
    _example_document = "research-sftp"

    def get_client(self) -> paramiko.SSHClient:
        """A connected, authenticated SSH client; the only place the password is unwrapped."""
        client = paramiko.SSHClient()
        known_hosts = self.known_hosts_path()
        if known_hosts.is_file():
            client.get_host_keys().load(str(known_hosts))
        client.set_missing_host_key_policy(_KnownHostsPolicy(self))
        key = self._load_key()
        try:
            client.connect(
                self.host,
                port=self.port,
                username=self.user,
                password=self.password.get_secret_value() if self.password else None,
                pkey=key,
                look_for_keys=key is None,  # paramiko's ~/.ssh/id_* (~ from HOME)
                allow_agent=False,
                timeout=self.connect_timeout,
                banner_timeout=self.connect_timeout,
                auth_timeout=self.connect_timeout,
                channel_timeout=self.connect_timeout,
            )
        except BaseException:
            client.close()
            raise
        return client

    def _load_key(self) -> paramiko.PKey | None:
        if not self.key_file:
            return None
        path = expand_home(self.key_file)
        try:
            return paramiko.PKey.from_path(path)
        except FileNotFoundError:
            raise PermanentTargetError(f"{self.where()}: key file {path} does not exist") from None
        except paramiko.PasswordRequiredException:
            raise PermanentTargetError(
                f"{self.where()}: key file {path} is encrypted; use a key without a passphrase"
            ) from None
        except OSError as exc:
            raise PermanentTargetError(
                f"{self.where()}: cannot read key file {path}: {_text(exc)}"
            ) from None
        except (paramiko.SSHException, ValueError):
            raise PermanentTargetError(
                f"{self.where()}: key file {path} is not a private key in a known format"
            ) from None

    @contextmanager
    def _sftp(self) -> Iterator[paramiko.SFTPClient]:
        with closing(self.get_client()) as client, closing(client.open_sftp()) as sftp:
            channel = sftp.get_channel()
            if channel is not None:
                channel.settimeout(self.io_timeout)
            yield sftp

    @contextmanager
    def _translate(self) -> Iterator[None]:
        """The one boundary where paramiko's and the socket's errors become ``TargetError``."""
        where = self.where()
        try:
            yield
        except TargetError:
            raise
        except _UnknownHostKeyError as exc:
            raise PermanentTargetError(f"{where}: {exc}") from None
        except paramiko.BadHostKeyException:
            raise PermanentTargetError(f"{where}: {self.changed_host_key_hint()}") from None
        except paramiko.PasswordRequiredException:
            raise PermanentTargetError(
                f"{where}: a key in ~/.ssh is encrypted; set key_file to a key without a passphrase"
            ) from None
        except paramiko.AuthenticationException:
            raise PermanentTargetError(
                f"{where}: authentication failed (user, key_file or password not accepted)"
            ) from None
        except paramiko.ssh_exception.NoValidConnectionsError as exc:
            why = next((_text(e) for e in exc.errors.values()), "connection refused")
            raise TransientTargetError(f"{where}: cannot connect: {why}") from None
        except socket.gaierror as exc:
            raise PermanentTargetError(f"{where}: cannot resolve host: {exc.strerror}") from None
        except TimeoutError:
            raise TransientTargetError(f"{where}: timed out") from None
        except (ConnectionError, EOFError, paramiko.SSHException) as exc:
            raise TransientTargetError(f"{where}: connection lost: {_text(exc)}") from None
        except (OSError, paramiko.SFTPError) as exc:
            raise PermanentTargetError(f"{where}: {_text(exc)}") from None

    def send(self, context: SendContext) -> SendResult:
        files = case_files(context.case_dir, self.file_filter)
        remote_case = self.remote_case_dir(context)
        with self._translate(), self._sftp() as sftp:
            self._require_folder(sftp)
            present = self._make_dirs(sftp, remote_case, files)
            sent = sent_bytes = total_bytes = 0
            for rel in files:
                with self._local(context, rel) as source:
                    info = os.fstat(source.fileno())
                    total_bytes += info.st_size
                    remote = posixpath.join(remote_case, rel.as_posix())
                    there = present.pop(rel.as_posix(), None)
                    if there is not None and _same_file(there, info):
                        continue
                    present.pop(_part_name(rel.as_posix()), None)  # re-used below
                    self._upload(sftp, source, info, remote, replace=there is not None)
                sent += 1
                sent_bytes += info.st_size
            for leftover, attrs in present.items():  # parts of an earlier, failed attempt
                if leftover.endswith(PART_SUFFIX) and stat.S_ISREG(attrs.st_mode or 0):
                    path = posixpath.join(remote_case, leftover)
                    with self._remote("remove", path):
                        sftp.remove(path)
            marker = posixpath.join(remote_case, COMPLETE_MARKER)
            with self._remote("write", marker):
                sftp.putfo(io.BytesIO(b""), marker, confirm=False)
        skipped = len(files) - sent
        detail = (
            f"{sent} file(s), {sent_bytes} bytes to sftp://{self.host}:{self.port}{remote_case}"
        )
        if skipped:
            detail += f" ({skipped} already there from an earlier attempt)"
        return SendResult(files=len(files), bytes=total_bytes, detail=detail)

    @contextmanager
    def _remote(self, action: str, path: str) -> Iterator[None]:
        """The server refused an operation on ``path``: say which (connection errors pass)."""
        try:
            yield
        except (ConnectionError, TimeoutError, EOFError):
            raise
        except (OSError, paramiko.SFTPError) as exc:
            raise PermanentTargetError(
                f"{self.where()}: cannot {action} {path}: {_text(exc)}"
            ) from None

    def _require_folder(self, sftp: paramiko.SFTPClient) -> None:
        try:
            attrs = sftp.stat(self.folder)
        except FileNotFoundError:
            raise PermanentTargetError(
                f"{self.where()}: remote folder {self.folder} does not exist"
            ) from None
        if not stat.S_ISDIR(attrs.st_mode or 0):
            raise PermanentTargetError(f"{self.where()}: {self.folder} is not a folder")

    def _make_dirs(
        self, sftp: paramiko.SFTPClient, remote_case: str, files: list[Path]
    ) -> dict[str, paramiko.SFTPAttributes]:
        """Create the case folder and its sub-folders; what is already in them, by relative path."""
        present: dict[str, paramiko.SFTPAttributes] = {}
        for sub in sorted({rel.parent.as_posix() for rel in files} | {"."}):
            remote_dir = posixpath.normpath(posixpath.join(remote_case, sub))
            try:
                listing = sftp.listdir_attr(remote_dir)
            except FileNotFoundError:
                with self._remote("create folder", remote_dir):
                    sftp.mkdir(remote_dir)
                continue
            for attrs in listing:
                present[posixpath.normpath(posixpath.join(sub, attrs.filename))] = attrs
        return present

    @contextmanager
    def _local(self, context: SendContext, rel: Path) -> Iterator[BinaryIO]:
        """A case file, opened at send time without following a link (a link is refused)."""
        try:
            source = context.files.open(rel)
        except OSError as exc:
            raise PermanentTargetError(
                f"{self.where()}: cannot read {rel}: {exc.strerror or exc}"
            ) from None
        with source:
            yield source

    def _upload(
        self,
        sftp: paramiko.SFTPClient,
        source: BinaryIO,
        info: os.stat_result,
        remote: str,
        *,
        replace: bool,
    ) -> None:
        """Stream one file to a hidden part file, give it the local time, rename it into place."""
        part = _part_name(remote)
        with self._remote("write", part):
            sftp.putfo(source, part, file_size=info.st_size, confirm=True)
        with self._remote("set the time of", part):
            sftp.utime(part, (info.st_atime, info.st_mtime))
        with self._remote("rename into place", remote):
            if replace:  # an older or partial copy is there: replace it atomically
                sftp.posix_rename(part, remote)
            else:
                sftp.rename(part, remote)

    def test_connection(self) -> dict[str, Any]:
        """mercure's keys: ``ping`` (here: TCP connect), ``loggedin`` (and the folder is there),
        ``err`` (why not, with how to fix an unknown host key)."""
        result: dict[str, Any] = {"ping": False, "loggedin": False, "err": ""}
        result["ping"] = tcp_reachable(self.host, self.port, min(self.connect_timeout, 5))
        if not result["ping"]:
            result["err"] = f"{self.where()}: cannot connect"
            return result
        try:
            with self._translate(), self._sftp() as sftp:
                self._require_folder(sftp)
            result["loggedin"] = True
        except TargetError as exc:
            result["err"] = str(exc)
        return result


def _same_file(remote: paramiko.SFTPAttributes, local: os.stat_result) -> bool:
    """rsync's quick check: a regular file of the same size and modification second."""
    return (
        stat.S_ISREG(remote.st_mode or 0)
        and remote.st_size == local.st_size
        and remote.st_mtime == int(local.st_mtime)
    )


def _part_name(path: str) -> str:
    """Where a file is written before it is renamed into place: hidden, beside it."""
    head, name = posixpath.split(path)
    return posixpath.join(head, f".{name}{PART_SUFFIX}")


def _text(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return str(exc) or type(exc).__name__
