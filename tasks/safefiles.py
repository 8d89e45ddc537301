"""Files we create in case folders, and the links we refuse to send: no symlink surprises.

A case folder is written by others (mercure's router, scripts, a peer we retrieve from), so
any name in it may already be a symbolic link planted to make us overwrite, or send, what it
points to. Every file we create there is therefore opened with ``O_CREAT|O_EXCL|O_NOFOLLOW``:
a new file or nothing. A file we replace (``task.json``, a report, the claim) is written to a
fresh random name opened that way, then renamed over the old name, which replaces a link
itself, never its target. ``task.json`` is read without following a link. Which links a case
may hold is :func:`case_links_problem`'s one decision, made once per attempt before anything
is sent; as a link can be planted after that check, senders also open every case file with
:class:`CaseFiles` at send time (no link followed on the way, the type checked on the open
descriptor) and send from that descriptor, and programs that open files by name themselves
(dcmsend, rsync) get a :func:`private_snapshot` of those descriptors instead of the case
folder. Pure: imports nothing of ours.
"""

from __future__ import annotations

import contextlib
import errno
import os
import secrets
import shutil
import stat
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

__all__ = [
    "LINK_REFUSED",
    "CaseFiles",
    "case_links_problem",
    "copy_regular",
    "create_new",
    "descriptor_path",
    "ensure_marker",
    "open_case_file",
    "open_new",
    "private_snapshot",
    "read_regular",
    "read_regular_stat",
    "replace_file",
]

_NEW_FLAGS = (
    os.O_WRONLY
    | os.O_CREAT
    | os.O_EXCL
    | getattr(os, "O_NOFOLLOW", 0)
    | getattr(os, "O_CLOEXEC", 0)
)
#: Reads never follow a link and never wait: a FIFO opened for reading would block the open
#: until a writer came; the type is checked on the open descriptor before anything is read.
_READ_FLAGS = (
    os.O_RDONLY
    | getattr(os, "O_NOFOLLOW", 0)
    | getattr(os, "O_NONBLOCK", 0)
    | getattr(os, "O_CLOEXEC", 0)
)
#: The start of every reason a case is refused for its links (tests and logs look for it).
LINK_REFUSED = "refused: the case folder holds"


def open_new(path: Path, mode: int = 0o644, buffering: int = -1) -> BinaryIO:
    """A new file at ``path`` for writing; ``FileExistsError`` if any entry (even a dangling
    link) is there already."""
    fd = os.open(path, _NEW_FLAGS, mode)
    return os.fdopen(fd, "wb", buffering=buffering)


def create_new(path: Path, data: bytes = b"", mode: int = 0o644) -> os.stat_result:
    """Write ``data`` to a new file at ``path`` (``FileExistsError`` if the name is taken);
    the new file's status, taken on its descriptor (its inode is the file we made)."""
    try:
        with open_new(path, mode) as fh:
            fh.write(data)
            return os.fstat(fh.fileno())
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


@contextlib.contextmanager
def _open_regular(path: Path) -> Iterator[tuple[BinaryIO, os.stat_result]]:
    """``path`` opened for reading with :data:`_READ_FLAGS`, and its status taken on the
    descriptor; anything but a regular file is ``OSError(EINVAL)``."""
    fd = os.open(path, _READ_FLAGS)
    with os.fdopen(fd, "rb") as fh:
        status = os.fstat(fd)
        if not stat.S_ISREG(status.st_mode):
            raise OSError(errno.EINVAL, f"{path.name} is not a regular file")
        yield fh, status


def read_regular(path: Path, limit: int | None = None) -> bytes:
    """The bytes of the regular file at ``path``, without following a link: a link there is
    ``OSError(ELOOP)``, anything else but a regular file ``OSError(EINVAL)``, a file over
    ``limit`` bytes ``OSError(EFBIG)`` (at most ``limit + 1`` bytes are read)."""
    return read_regular_stat(path, limit)[0]


def read_regular_stat(path: Path, limit: int | None = None) -> tuple[bytes, os.stat_result]:
    """:func:`read_regular`, with the status of the file read (taken on its descriptor: the
    inode is the one the bytes came from, whatever is renamed meanwhile)."""
    with _open_regular(path) as (fh, status):
        data = fh.read() if limit is None else fh.read(limit + 1)
        if limit is not None and len(data) > limit:
            raise OSError(errno.EFBIG, f"{path.name} is over {limit} bytes")
        return data, status


def copy_regular(src: Path, dst: Path) -> None:
    """Copy the regular file ``src`` to a new file ``dst`` (times and mode kept), opening
    neither through a link: ``src`` as :func:`read_regular` does (anything but a regular file
    is ``OSError(EINVAL)``, a link ``OSError(ELOOP)``), ``dst`` as :func:`open_new`."""
    with _open_regular(src) as (fh, info):
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


# --------------------------------------------------------------------------------------------
# Reading case files at send time
# --------------------------------------------------------------------------------------------

_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
_CLOEXEC = getattr(os, "O_CLOEXEC", 0)
#: A case file: never through a link, never blocking on a FIFO swapped in (type checked after).
_CASE_FILE_FLAGS = os.O_RDONLY | _NOFOLLOW | getattr(os, "O_NONBLOCK", 0) | _CLOEXEC
_CASE_DIR_FLAGS = os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) | _NOFOLLOW | _CLOEXEC
#: Links followed (inside the case, ``links_inside``) on the way to one file, as the kernel's.
_MAX_LINKS = 40
_COPY_CHUNK = 1024 * 1024


def open_case_file(case_dir: Path, path: Path, *, links_inside: bool = False) -> BinaryIO:
    """The regular file ``path`` (relative to ``case_dir``, or under it) open for reading.

    Every folder on the way is opened from the one before it without following a link, so no
    link, wherever it is and whenever it was planted, leads out of the case: a link is an
    ``OSError(ELOOP)`` naming the file, unless ``links_inside``, where a link that stays inside
    the case folder is resolved here, component by component (as ``case_links_problem`` allows
    it). A FIFO or device is ``OSError(EINVAL)``: opened non-blocking, its type is checked on
    the descriptor before anything is read.
    """
    rel = path.relative_to(case_dir) if path.is_absolute() else path
    fds = [os.open(case_dir, _CASE_DIR_FLAGS)]
    try:
        return _walk(case_dir, rel, fds, links_inside)
    finally:
        for fd in fds:
            os.close(fd)


def _walk(case_dir: Path, rel: Path, fds: list[int], links_inside: bool) -> BinaryIO:
    """Open ``rel`` below ``fds[0]``; ``fds`` holds the folders entered (closed by the caller)."""
    pending = list(rel.parts)
    hops = 0
    while pending:
        name = pending.pop(0)
        if name in ("", "."):
            continue
        if name == "..":
            if len(fds) == 1:
                raise OSError(errno.ELOOP, f"{rel} leads outside the case folder", str(rel))
            os.close(fds.pop())
            continue
        last = not pending
        try:
            fd = os.open(name, _CASE_FILE_FLAGS if last else _CASE_DIR_FLAGS, dir_fd=fds[-1])
        except OSError as exc:
            if exc.errno not in (errno.ELOOP, errno.ENOTDIR, errno.EMLINK):
                raise
            if not stat.S_ISLNK(os.stat(name, dir_fd=fds[-1], follow_symlinks=False).st_mode):
                raise
            hops += 1
            if not links_inside or hops > _MAX_LINKS:
                what = "is" if last else f"is reached through {name}, which is"
                raise OSError(
                    errno.ELOOP, f"{rel} {what} a symbolic link; links are not sent", str(rel)
                ) from None
            target = os.readlink(name, dir_fd=fds[-1])
            pending[:0] = _inside_parts(case_dir, rel, target, fds)
            continue
        if last:
            return _regular(fd, rel)
        fds.append(fd)
    raise OSError(errno.EISDIR, f"{rel} is the case folder itself", str(rel))


def _inside_parts(case_dir: Path, rel: Path, target: str, fds: list[int]) -> list[str]:
    """The components a link's ``target`` stands for; an absolute one must name the case."""
    if not os.path.isabs(target):
        return list(Path(target).parts)
    for root in (case_dir.absolute(), case_dir.resolve()):
        if Path(target) == root or root in Path(target).parents:
            while len(fds) > 1:
                os.close(fds.pop())
            return list(Path(target).relative_to(root).parts)
    raise OSError(errno.ELOOP, f"{rel} leads outside the case folder", str(rel))


def _regular(fd: int, rel: Path) -> BinaryIO:
    """``fd`` as a blocking binary file, if it is a regular file; closed otherwise."""
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise OSError(errno.EINVAL, f"{rel} is not a regular file", str(rel))
        os.set_blocking(fd, True)
    except BaseException:
        os.close(fd)
        raise
    return os.fdopen(fd, "rb")


@dataclass(frozen=True)
class CaseFiles:
    """How the senders open one case's files (picklable: it travels to sender processes).

    ``links_inside`` is the site's ``case_links_inside``: a link that stays inside the case is
    read as the file it names; any other link is refused.
    """

    root: Path
    links_inside: bool = False

    def open(self, path: Path) -> BinaryIO:
        """``path`` (under ``root``, or relative to it) open for reading; see
        :func:`open_case_file`."""
        return open_case_file(self.root, path, links_inside=self.links_inside)


def descriptor_path(fh: BinaryIO) -> str:
    """A name that opens the very file behind ``fh`` (Linux ``/proc/self/fd``), for libraries
    that take only a file name: re-opening it never looks at the case folder again."""
    return f"/proc/self/fd/{fh.fileno()}"


@contextlib.contextmanager
def private_snapshot(files: CaseFiles, paths: Sequence[Path]) -> Iterator[Path]:
    """A private folder (0700, under ``TMPDIR``, outside the case) holding ``paths`` (relative
    to the case) as they are when opened here, for programs that open files by name.

    Each entry is a hard link to the file opened with :meth:`CaseFiles.open`, kept only if
    ``lstat`` on the private name shows a regular file with that descriptor's inode (the case
    name could have been swapped between the open and the link), else a copy read from the
    descriptor with its modification time. Removed on exit.
    """
    folder = Path(tempfile.mkdtemp(prefix="dicom-dispatch-snapshot-"))
    try:
        for rel in paths:
            private = folder / rel
            private.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            with files.open(rel) as source:
                _link_or_copy(files.root / rel, source, private)
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def _link_or_copy(name: Path, source: BinaryIO, private: Path) -> None:
    opened = os.fstat(source.fileno())
    try:
        os.link(name, private, follow_symlinks=False)
    except OSError:
        pass  # another file system, a hard-link limit, protected_hardlinks: copy
    else:
        there = os.lstat(private)
        if stat.S_ISREG(there.st_mode) and (there.st_dev, there.st_ino) == (
            opened.st_dev,
            opened.st_ino,
        ):
            return
        private.unlink()
    with open_new(private, mode=0o600) as out:
        shutil.copyfileobj(source, out, _COPY_CHUNK)
    os.utime(private, ns=(opened.st_atime_ns, opened.st_mtime_ns))
