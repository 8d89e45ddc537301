"""mercure's rsync target: the ``rsync`` binary over ``ssh``, then ``.complete`` and, optionally,
the site's completion script.

Remote layout as mercure's: ``<folder>/<case folder name>/`` with the case's files, then
``ssh touch .../.complete``, then (``run_on_complete``) ``<folder>/mercure_complete.sh
<folder>/<case> <target name>``. Fixes over mercure (architecture §4.1, §4.2):

- the host key is checked against ``known_hosts_file`` (``StrictHostKeyChecking=yes``; mercure:
  ``accept-new``, which ``trust_on_first_use`` restores); port, key and known-hosts file are
  passed explicitly, as OpenSSH reads ``~`` from the passwd entry, not from ``HOME``;
- the completion script gets the target's name (mercure passed the literal ``rsync``);
- every command has a timeout, runs without a shell, and is killed with its ``ssh`` child when it
  overruns; a password goes to ``sshpass`` through a pipe, never on a command line or in the
  environment;
- the claim marker and our temporary files are never sent, ``file_filter`` is trimmed and matches
  as for the Folder and SFTP targets (the file list is ours, handed to ``--files-from``);
- directories are created traversable (mercure's ``--chmod 660`` also applied to them);
- rsync, which opens files by name, sends a private snapshot of the case (``blocks._snapshot``),
  never the case folder: a link planted in the case at any time fails the send, naming the file.

rsync itself makes retries safe: files arrive under temporary names and are renamed when whole, a
retry re-uses the remote folder and skips files that already arrived (same size and time).
"""

from __future__ import annotations

import math
import os
import posixpath
import shlex
import signal
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from pydantic import Field

from blocks._net import tcp_reachable
from blocks._snapshot import case_snapshot
from blocks.base import SendContext, SendResult
from blocks.errors import PermanentTargetError, TargetError, TransientTargetError
from blocks.sftp import COMPLETE_MARKER, SshTarget, case_files, host_key_name

__all__ = ["RsyncTarget"]

COMPLETE_SCRIPT = "mercure_complete.sh"
DEFAULT_TRANSFER_TIMEOUT = 3600.0
#: Exit statuses of our remote shell lines (ssh itself uses 255; scripts seldom use these).
_NO_MARKER, _NO_FOLDER, _NO_SCRIPT = 201, 202, 203
#: rsync exit codes worth a quick retry: protocol start, socket/stream, timeouts.
_TRANSIENT_EXIT_CODES = {5, 10, 12, 30, 35}
_TRANSIENT_SSH_TEXT = (
    "Connection refused",
    "Connection timed out",
    "Connection reset",
    "Connection closed",
    "No route to host",
    "Network is unreachable",
    "timed out",
    "Broken pipe",
)


@dataclass
class _Done:
    returncode: int
    stderr: str


class RsyncTarget(SshTarget):
    """A server that receives each case by ``rsync`` over ``ssh``, plus ``.complete``.

    Needs ``rsync`` and ``ssh`` here and ``rsync`` on the server; a ``password`` also needs
    ``sshpass`` here. With ``run_on_complete``, ``<folder>/mercure_complete.sh <folder>/<case>
    <target name>`` runs on the server after ``.complete`` is written.
    """

    _block_type_name = "rsync Target"
    _block_type_slug = "rsync-target"
    _description = "mercure's rsync target: copies each case folder with rsync over ssh."
    target_type: ClassVar[str] = "rsync"
    _example_document = "archive-rsync"

    run_on_complete: bool = Field(
        default=False,
        description="After .complete, run <folder>/mercure_complete.sh <case> <target name>.",
    )
    transfer_timeout: float = Field(
        default=DEFAULT_TRANSFER_TIMEOUT,
        gt=0,
        description="Seconds one rsync run may take at most (stalls end sooner: io_timeout).",
    )

    # Command lines (no secret ever goes into one).

    def ssh_command(self) -> list[str]:
        """``ssh`` with every option explicit: port, user, keys, host key checking, timeouts."""
        known_hosts = str(self.known_hosts_path())
        if any(c.isspace() for c in known_hosts):
            known_hosts = f'"{known_hosts}"'  # ssh splits option values on blanks
        alive = max(1, math.ceil(self.io_timeout / 3))
        argv = [
            "ssh",
            "-p",
            str(self.port),
            "-l",
            self.user,
            "-o",
            f"UserKnownHostsFile={known_hosts}",
            "-o",
            f"StrictHostKeyChecking={'accept-new' if self.trust_on_first_use else 'yes'}",
            "-o",
            f"ConnectTimeout={math.ceil(self.connect_timeout)}",
            "-o",
            f"ServerAliveInterval={alive}",
            "-o",
            "ServerAliveCountMax=3",
            "-o",
            "LogLevel=ERROR",
        ]
        for key in self.key_paths():
            argv += ["-i", str(key)]
        if self.key_file:
            argv += ["-o", "IdentitiesOnly=yes"]
        if self.password is None:
            argv += ["-o", "BatchMode=yes"]
        else:
            argv += ["-o", "NumberOfPasswordPrompts=1"]
        return argv

    def rsync_command(self, context: SendContext, source: Path | None = None) -> list[str]:
        """rsync of ``source`` (the case's private snapshot; default: the case folder)."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return [
            "rsync",
            "-tz",
            "--chmod=D770,F660",
            "--from0",
            "--files-from=-",
            f"--timeout={math.ceil(self.io_timeout)}",
            "-e",
            _rsync_rsh(self.ssh_command()),
            f"{source or context.case_dir}/",
            f"{host}:{self.remote_case_dir(context)}/",
        ]

    def remote_command(self, command: str) -> list[str]:
        """``ssh`` running ``command`` (a shell line for the remote user's shell)."""
        return [*self.ssh_command(), self.host, "--", command]

    # Running them.

    def _run(self, argv: list[str], *, timeout: float, stdin: bytes | None = None) -> _Done:
        """Run without a shell; a password reaches ``sshpass`` through a pipe; kill on timeout."""
        env = {**os.environ, "LC_ALL": "C"}
        env.pop("SSHPASS", None)
        pass_fds: tuple[int, ...] = ()
        read_end = -1
        if self.password is not None:
            read_end, write_end = os.pipe()
            os.write(write_end, self.password.get_secret_value().encode() + b"\n")
            os.close(write_end)
            pass_fds = (read_end,)
            argv = ["sshpass", "-d", str(read_end), *argv]
        try:
            proc = subprocess.Popen(
                argv,
                stdin=subprocess.PIPE if stdin is not None else subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
                env=env,
                pass_fds=pass_fds,
                start_new_session=True,  # one process group: rsync and its ssh
            )
        except FileNotFoundError:
            raise PermanentTargetError(
                f"{self.where()}: {argv[0]} is not installed on this machine"
            ) from None
        finally:
            if read_end >= 0:
                os.close(read_end)
        try:
            _, err = proc.communicate(stdin, timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
            raise TransientTargetError(
                f"{self.where()}: {argv[0]} did not finish within {timeout:g} s"
            ) from None
        return _Done(proc.returncode, err.decode("utf-8", "replace"))

    def _ssh_timeout(self) -> float:
        return self.connect_timeout + self.io_timeout

    def _check(self, done: _Done, step: str) -> None:
        if done.returncode != 0:
            raise self._error(done, step)

    def _error(self, done: _Done, step: str) -> TargetError:
        """The one place where an exit code and stderr become a ``TargetError``."""
        where, text, code = self.where(), done.stderr, done.returncode
        if "IDENTIFICATION HAS CHANGED" in text:
            return PermanentTargetError(f"{where}: {self.changed_host_key_hint()}")
        if "Host key verification failed" in text:
            return PermanentTargetError(
                f"{where}: the host key of {host_key_name(self.host, self.port)} is not in "
                f"{self.known_hosts_path()}: {self.unknown_host_key_hint()}"
            )
        wrong_password = self.password is not None and code == 5 and "rsync error:" not in text
        if "Permission denied (" in text or wrong_password:  # sshpass: 5 = wrong password
            return PermanentTargetError(
                f"{where}: authentication failed (user, key_file or password not accepted)"
            )
        line = _reason(text) or f"exit status {code}"
        message = f"{where}: {step} failed: {line}"
        transient = code in _TRANSIENT_EXIT_CODES or (
            code == 255 and any(t in text for t in _TRANSIENT_SSH_TEXT)
        )
        return (TransientTargetError if transient else PermanentTargetError)(message)

    # The verbs.

    def send(self, context: SendContext) -> SendResult:
        files = case_files(context.case_dir, self.file_filter)
        remote_case = self.remote_case_dir(context)
        listing = b"".join(os.fsencode(rel) + b"\0" for rel in files)
        with case_snapshot(context.files, files, self.where()) as snapshot:
            size = sum((snapshot / rel).stat().st_size for rel in files)
            command = self.rsync_command(context, snapshot)
            done = self._run(command, timeout=self.transfer_timeout, stdin=listing)
        self._check(done, "rsync")
        # One ssh session for the marker and the script (mercure used up to three).
        marker = posixpath.join(remote_case, COMPLETE_MARKER)
        quoted = shlex.quote(remote_case)
        line = f"mkdir -p -- {quoted} && touch -- {shlex.quote(marker)} || exit {_NO_MARKER}"
        detail = f"{len(files)} file(s) to {self.host}:{remote_case} by rsync"
        if self.run_on_complete:
            script = shlex.quote(posixpath.join(self.folder, COMPLETE_SCRIPT))
            name = shlex.quote(self.target_name or self.target_type)
            line += f"; test -x {script} || exit {_NO_SCRIPT}; {script} {quoted} {name}"
            detail += f", {COMPLETE_SCRIPT} run"
        done = self._run(self.remote_command(line), timeout=self.transfer_timeout)
        if done.returncode == _NO_SCRIPT:
            raise PermanentTargetError(f"{self.where()}: {self._script_missing()}")
        step = "touch .complete" if done.returncode == _NO_MARKER else COMPLETE_SCRIPT
        self._check(done, step)
        return SendResult(files=len(files), bytes=size, detail=detail)

    def test_connection(self) -> dict[str, Any]:
        """mercure's keys, steps in order until one fails: ``ping`` (here: TCP connect to the
        SSH port), ``ssh_connected``, ``folder_exists``, ``exec_script_exists`` (only with
        ``run_on_complete``), ``err`` (why not, with how to fix an unknown host key)."""
        result: dict[str, Any] = {
            "ping": tcp_reachable(self.host, self.port, min(self.connect_timeout, 5)),
            "ssh_connected": None,
            "folder_exists": None,
            "exec_script_exists": None,
            "err": "",
        }
        if not result["ping"]:
            result["err"] = f"{self.where()}: cannot connect"
            return result
        # One ssh session for every step; each failing step has its own exit status.
        line = f"test -d {shlex.quote(self.folder)} || exit {_NO_FOLDER}"
        if self.run_on_complete:
            script = posixpath.join(self.folder, COMPLETE_SCRIPT)
            line += f"; test -x {shlex.quote(script)} || exit {_NO_SCRIPT}"
        try:
            done = self._run(self.remote_command(line), timeout=self._ssh_timeout())
        except TargetError as exc:
            result["ssh_connected"], result["err"] = False, str(exc)
            return result
        code = done.returncode
        result["ssh_connected"] = code in (0, _NO_FOLDER, _NO_SCRIPT)
        if not result["ssh_connected"]:
            result["err"] = str(self._error(done, "ssh"))
            return result
        result["folder_exists"] = code != _NO_FOLDER
        if code == _NO_FOLDER:
            result["err"] = f"{self.where()}: remote folder {self.folder} does not exist"
            return result
        if self.run_on_complete:
            result["exec_script_exists"] = code != _NO_SCRIPT
            if code == _NO_SCRIPT:
                result["err"] = f"{self.where()}: {self._script_missing()}"
        return result

    def _script_missing(self) -> str:
        return f"{posixpath.join(self.folder, COMPLETE_SCRIPT)} is missing or not executable"


def _rsync_rsh(argv: list[str]) -> str:
    """One ``-e`` string: rsync splits it on spaces and honours single and double quotes."""
    words = []
    for arg in argv:
        if arg and not any(c.isspace() or c in "'\"\\" for c in arg):
            words.append(arg)
        elif "'" not in arg:
            words.append(f"'{arg}'")
        elif '"' not in arg:
            words.append(f'"{arg}"')
        else:
            raise PermanentTargetError(f"cannot pass {arg!r} to rsync's -e: it has both quotes")
    return " ".join(words)


def _reason(stderr: str) -> str:
    """The most telling line of rsync's or ssh's complaint, on one line."""
    lines = [ln.strip() for ln in stderr.splitlines() if ln.strip()]
    useful = [
        ln
        for ln in lines
        if not ln.startswith("rsync: connection unexpectedly closed")
        and not ln.startswith("rsync error:")
    ]
    summary = next((ln for ln in lines if ln.startswith("rsync error:")), "")
    first = useful[0] if useful else summary
    if summary and first != summary:
        code = summary.rsplit("(code ", 1)[-1].split(")", 1)[0]
        first = f"{first} (rsync code {code})" if code.isdigit() else first
    return first[:300]
