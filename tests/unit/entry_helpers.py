"""What the tests of hostile folder entries share: a call that must finish (a FIFO must not block
it), a call made as an unprivileged user (root ignores permission bits, and CI runs as root), a
folder that user can reach, and the entries themselves.
"""

from __future__ import annotations

import contextlib
import os
import pickle
import pwd
import select
import shutil
import stat
import tempfile
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest

T = TypeVar("T")
#: Long enough for a loaded machine; a call blocked on a FIFO never returns at all.
FINISH_SECONDS = 20.0


def finishes(call: Callable[[], T], timeout: float = FINISH_SECONDS) -> T:
    """``call()``'s result; the test fails (instead of hanging) when it has not returned in
    ``timeout`` s. A thread left blocked is a daemon; :func:`unblock` frees it."""
    box: dict[str, Any] = {}

    def run() -> None:
        try:
            box["value"] = call()
        except BaseException as exc:
            box["error"] = exc

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(timeout)
    if thread.is_alive():
        pytest.fail(f"did not finish within {timeout} s: blocked on an entry")
    if "error" in box:
        raise box["error"]
    return box["value"]  # type: ignore[no-any-return]


def unblock(fifo: Path) -> None:
    """Let a reader blocked in ``open`` of ``fifo`` go on (it then reads end of file)."""
    with contextlib.suppress(OSError):
        os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))


def _nobody() -> pwd.struct_passwd:
    try:
        return pwd.getpwnam("nobody")
    except KeyError:
        pytest.skip("no user 'nobody' to run as")


def service_uid() -> int:
    """The uid the permission tests run as: ``nobody`` under root, else ourselves."""
    return _nobody().pw_uid if os.geteuid() == 0 else os.geteuid()


def as_service_user(call: Callable[[], T], timeout: float = FINISH_SECONDS) -> T:
    """``call()`` run with permission bits in force: under root in a forked child that became
    ``nobody`` (its result or exception pickled back), else right here."""
    if os.geteuid() != 0:
        return finishes(call, timeout)
    user = _nobody()
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        try:
            os.close(read_end)
            os.setgroups([])
            os.setgid(user.pw_gid)
            os.setuid(user.pw_uid)
            try:
                outcome: tuple[bool, Any] = (True, call())
            except BaseException as exc:
                outcome = (False, exc)
            with os.fdopen(write_end, "wb") as out:
                out.write(pickle.dumps(outcome))
        finally:
            os._exit(0)
    os.close(write_end)
    try:
        ready, _, _ = select.select([read_end], [], [], timeout)
        if not ready:
            os.kill(pid, 9)
            pytest.fail(f"did not finish within {timeout} s as the service user")
        with os.fdopen(read_end, "rb", closefd=False) as source:
            data = source.read()
    finally:
        os.close(read_end)
        os.waitpid(pid, 0)
    ok, value = pickle.loads(data)
    if not ok:
        raise value
    return value  # type: ignore[no-any-return]


@pytest.fixture
def shared_root() -> Iterator[Path]:
    """A folder the service user can reach (pytest's tmp_path is private to its user), with
    outgoing/ success/ error/ the service user owns."""
    root = Path(tempfile.mkdtemp(prefix="dicom-dispatch-entries-"))
    root.chmod(0o755)
    uid = service_uid()
    for name in ("outgoing", "success", "error"):
        (root / name).mkdir()
        os.chown(root / name, uid, -1)
    try:
        yield root
    finally:
        for folder in root.rglob("*"):  # 000 folders of the tests: removable again
            if folder.is_dir() and not folder.is_symlink():
                folder.chmod(0o755)
        shutil.rmtree(root, ignore_errors=True)


def give_to_service_user(path: Path) -> None:
    """``chown -R`` to the service user (without following links)."""
    uid = service_uid()
    os.chown(path, uid, -1, follow_symlinks=False)
    for entry in path.rglob("*"):
        os.chown(entry, uid, -1, follow_symlinks=False)


def fifo_at(path: Path) -> Path:
    os.mkfifo(path)
    return path


def device_at(path: Path) -> Path:
    """A character device like /dev/null at ``path`` (mknod needs root)."""
    try:
        os.mknod(path, stat.S_IFCHR | 0o666, os.makedev(1, 3))
    except PermissionError:
        pytest.skip("creating a device node needs root")
    return path
