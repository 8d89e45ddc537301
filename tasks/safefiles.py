"""Files we create in case folders, and the links we refuse to send: no symlink surprises.

A case folder is written by others (mercure's router, scripts, a peer we retrieve from), so
any name in it may already be a symbolic link planted to make us overwrite, or send, what it
points to. Every file we create there is therefore opened with ``O_CREAT|O_EXCL|O_NOFOLLOW``:
a new file or nothing. A file we replace (``task.json``, a report, the claim) is written to a
fresh random name opened that way, then renamed over the old name, which replaces a link
itself, never its target. ``task.json`` is read without following a link. Which links a case
may hold is :func:`case_links_problem`'s one decision, made once per attempt before anything
is sent. Pure: imports nothing of ours.
"""

from __future__ import annotations

import contextlib
import errno
import os
import secrets
import shutil
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

__all__ = [
    "LINK_REFUSED",
    "case_links_problem",
    "copy_regular",
    "create_new",
    "ensure_marker",
    "open_new",
    "read_regular",
    "replace_file",
]

_NEW_FLAGS = (
    os.O_WRONLY
    | os.O_CREAT
    | os.O_EXCL
    | getattr(os, "O_NOFOLLOW", 0)
    | getattr(os, "O_CLOEXEC", 0)
)
#: Non-blocking too: opening a FIFO planted where a file was expected must not wait forever.
_READ_FLAGS = (
    os.O_RDONLY
    | getattr(os, "O_NOFOLLOW", 0)
    | getattr(os, "O_CLOEXEC", 0)
    | getattr(os, "O_NONBLOCK", 0)
)
#: The start of every reason a case is refused for its links (tests and logs look for it).
LINK_REFUSED = "refused: the case folder holds"


def open_new(path: Path, mode: int = 0o644, buffering: int = -1) -> BinaryIO:
    """A new file at ``path`` for writing; ``FileExistsError`` if any entry (even a dangling
    link) is there already."""
    fd = os.open(path, _NEW_FLAGS, mode)
    return os.fdopen(fd, "wb", buffering=buffering)


def create_new(path: Path, data: bytes = b"", mode: int = 0o644) -> None:
    """Write ``data`` to a new file at ``path`` (``FileExistsError`` if the name is taken)."""
    try:
        with open_new(path, mode) as fh:
            fh.write(data)
    except FileExistsError:
        raise
    except BaseException:
        with contextlib.suppress(OSError):
            path.unlink()
        raise


def ensure_marker(path: Path) -> None:
    """An empty marker file at ``path`` (``.lock``, ``.complete``): created if absent, left as
    it is if a regular file is there; a link or anything else there is an ``OSError``."""
    try:
        create_new(path)
    except FileExistsError:
        if not stat.S_ISREG(os.lstat(path).st_mode):
            raise OSError(errno.EEXIST, f"{path.name} exists and is not a regular file") from None


@contextlib.contextmanager
def _temporary_beside(path: Path, mode: int) -> Iterator[tuple[BinaryIO, Path]]:
    """A new file with an unguessable name in ``path``'s folder, removed unless renamed."""
    for _ in range(100):
        hidden = path.name if path.name.startswith(".") else f".{path.name}"
        tmp = path.with_name(f"{hidden}.{secrets.token_hex(8)}.tmp")
        try:
            fh = open_new(tmp, mode)
            break
        except FileExistsError:
            continue
    else:  # pragma: no cover - 100 collisions of 64 random bits
        raise FileExistsError(errno.EEXIST, f"no free temporary name beside {path}")
    try:
        with fh:
            yield fh, tmp
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


def replace_file(path: Path, data: bytes, *, mode: int = 0o644, fsync: bool = False) -> None:
    """Replace ``path`` with ``data`` atomically: a new random file beside it, then a rename
    (over a link at ``path`` the rename replaces the link, never what it points to)."""
    with _temporary_beside(path, mode) as (fh, tmp):
        fh.write(data)
        fh.flush()
        if fsync:
            os.fsync(fh.fileno())
        os.replace(tmp, path)


def read_regular(path: Path, limit: int | None = None) -> bytes:
    """The bytes of the regular file at ``path``, without following a link: a link there is
    ``OSError(ELOOP)``, anything else but a regular file ``OSError(EINVAL)``, a file larger
    than ``limit`` bytes ``OSError(EFBIG)``.

    The open never blocks (a FIFO) and the type is checked on the open descriptor, so what
    is read is what was checked; nothing beyond ``limit`` is read (a file that grows).
    """
    fd = os.open(path, _READ_FLAGS)
    with os.fdopen(fd, "rb") as fh:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise OSError(errno.EINVAL, f"{path.name} is not a regular file")
        if limit is None:
            return fh.read()
        data = fh.read(limit + 1) if info.st_size <= limit else b""
        if info.st_size > limit or len(data) > limit:
            raise OSError(errno.EFBIG, f"{path.name} is larger than {limit} bytes")
        return data


def copy_regular(src: Path, dst: Path) -> None:
    """Copy the regular file ``src`` to a new file ``dst`` (times and mode kept), opening
    neither through a link: ``src`` as :func:`read_regular` does (anything but a regular file
    is ``OSError(EINVAL)``, a link ``OSError(ELOOP)``), ``dst`` as :func:`open_new`."""
    fd = os.open(src, _READ_FLAGS)
    with os.fdopen(fd, "rb") as fh:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise OSError(errno.EINVAL, f"{src} is not a regular file")
        try:
            with open_new(dst, stat.S_IMODE(info.st_mode)) as out:
                shutil.copyfileobj(fh, out, 2**20)
        except BaseException:
            with contextlib.suppress(OSError):
                dst.unlink()
            raise
    os.utime(dst, ns=(info.st_atime_ns, info.st_mtime_ns), follow_symlinks=False)


def case_links_problem(case_dir: Path, *, allow_inside: bool = False) -> str | None:
    """Why a case may not be sent for what its folder holds, or None.

    A symbolic link is refused, unless ``allow_inside`` and it resolves to an entry inside the
    case folder; so is anything that is neither a regular file nor a folder (a FIFO, a device:
    a send would hang on or read from it). Links are never followed while looking.
    """
    root = case_dir.resolve()
    for folder, dirs, files in os.walk(case_dir, followlinks=False):
        for name in [*dirs, *files]:
            entry = Path(folder) / name
            try:
                mode = os.lstat(entry).st_mode
            except FileNotFoundError:
                continue  # gone meanwhile (a temporary file of ours)
            where = entry.relative_to(case_dir)
            if stat.S_ISLNK(mode):
                if allow_inside and _inside(entry, root):
                    continue
                target = os.readlink(entry)
                why = "it leads outside the case folder" if allow_inside else "links are not sent"
                return f"{LINK_REFUSED} a symbolic link {where} -> {target}; {why}"
            if not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
                return f"{LINK_REFUSED} {where}, which is not a regular file"
    return None


def _inside(link: Path, root: Path) -> bool:
    """Whether ``link`` resolves to an existing regular file or folder under ``root``."""
    try:
        target = link.resolve(strict=True)
    except (OSError, RuntimeError):
        return False
    if target != root and root not in target.parents:
        return False
    mode = os.stat(target).st_mode
    return stat.S_ISREG(mode) or stat.S_ISDIR(mode)
