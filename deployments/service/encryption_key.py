"""The block-secret encryption key, kept outside the database it protects.

Prefect encrypts block secrets (target passwords, keys) with a Fernet key that, by default, it
stores in the same database as the secrets: a copy of the database is a copy of the passwords.
For the database we run (embedded PostgreSQL or our SQLite file), the key lives in a 0600 file
in the data directory instead and every server we start gets it as
``PREFECT_SERVER_ENCRYPTION_KEY``. On the first start after an upgrade the key Prefect stored is
copied to that file and then deleted from the database, so existing secrets still decrypt.

The move runs once, in a child process (``python -m deployments.service.encryption_key``): it needs
Prefect's server database layer, which a service process should not carry for its lifetime.
A key the site sets itself (``PREFECT_SERVER_ENCRYPTION_KEY``) is left alone.
"""

from __future__ import annotations

import asyncio
import getpass
import os
import stat
import subprocess
import sys
from pathlib import Path

from blocks.errors import ConfigError, first_line
from blocks.host import data_dir
from tasks.safefiles import create_new, read_regular

__all__ = [
    "KEY_ENV",
    "KEY_FILE",
    "EncryptionKeyError",
    "ensure_encryption_key",
    "move_key_out_of_database",
    "read_key_file",
]

KEY_FILE = "encryption-key"
KEY_ENV = "PREFECT_SERVER_ENCRYPTION_KEY"
DB_KEY = "ENCRYPTION_KEY"
MOVE_TIMEOUT = 300.0


class EncryptionKeyError(ConfigError):
    """The key file is there but unusable, or missing while secrets need it: nothing starts."""


def _unusable(path: Path, why: str) -> EncryptionKeyError:
    user = getpass.getuser()
    return EncryptionKeyError(
        f"the encryption key file {path} {why}; every block secret needs this key, so nothing "
        f"starts and it is left as it is: make it a regular file owned by {user}, mode 0600 "
        f"(chown {user} {path}; chmod 600 {path})"
    )


def read_key_file(path: Path) -> str | None:
    """The key in ``path``; ``None`` only when no file is there at all.

    Anything else that stops the read (no permission, a directory, a link, not a key) is an
    :class:`EncryptionKeyError`, never "no key": a new key would replace the file and every
    secret stored with the old one would be lost for good.
    """
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise _unusable(path, f"cannot be looked at ({exc.strerror})") from None
    if not stat.S_ISREG(info.st_mode):
        raise _unusable(path, "is not a regular file (a link, a directory, ...)")
    try:
        key = read_regular(path).decode("ascii").strip()
    except OSError as exc:
        raise _unusable(path, f"cannot be read ({exc.strerror or exc})") from None
    except UnicodeDecodeError:
        key = ""
    if not _is_fernet_key(key):
        raise _unusable(path, "does not hold a key (it is empty or damaged)")
    return key


def _is_fernet_key(key: str) -> bool:
    from cryptography.fernet import Fernet

    try:
        Fernet(key.encode())
    except ValueError:
        return False
    return True


def ensure_encryption_key(home: Path) -> None:
    """Put the data directory's key in ``PREFECT_SERVER_ENCRYPTION_KEY`` (moved there first
    from the database on the first start). Call after the database URL is set.

    Raises:
        EncryptionKeyError: the key file is unusable, or missing while the database holds
            secrets encrypted with a key it no longer has.
    """
    if os.environ.get(KEY_ENV) or os.environ.get("ORION_ENCRYPTION_KEY"):
        return
    path = home / KEY_FILE
    key = read_key_file(path)
    if key is None:
        done = subprocess.run(
            [sys.executable, "-m", "deployments.service.encryption_key"],
            env={**os.environ, "DICOM_DISPATCH_HOME": str(home)},
            capture_output=True,
            text=True,
            timeout=MOVE_TIMEOUT,
            check=False,
        )
        if done.returncode != 0:
            tail = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["no output"]
            raise EncryptionKeyError(tail[0])
        key = read_key_file(path)
        if key is None:
            raise EncryptionKeyError(f"could not set up the encryption key in {path}")
    os.environ[KEY_ENV] = key


async def move_key_out_of_database(home: Path) -> str:
    """Copy the key Prefect stored in the database to the key file, then delete it there.

    The schema is migrated first (the server would do it on start anyway), so "no key in the
    database" is an answer, not a missing table. A fresh database gets a new key; a database
    that holds block documents (Prefect encrypts every one's data) but no key gets none: they
    were written with the key of a file that is gone, and only that file can read them. The
    file is created, never replaced, before the row is deleted: a crash in between leaves
    both, never neither.
    """
    import sqlalchemy as sa
    from cryptography.fernet import Fernet
    from prefect.server.database import provide_database_interface
    from prefect.server.models import configuration

    db = provide_database_interface()
    await db.create_db()
    path = home / KEY_FILE
    async with db.session_context(begin_transaction=True) as session:
        stored = await configuration.read_configuration(session, DB_KEY)  # type: ignore[attr-defined]
        db_key = str(stored.value["fernet_key"]) if stored is not None else None
        on_file = read_key_file(path)
        if on_file is None and db_key is None:
            count = sa.select(sa.func.count()).select_from(db.BlockDocument)
            encrypted = int((await session.execute(count)).scalar_one())
            if encrypted:
                raise EncryptionKeyError(
                    f"the encryption key file {path} is missing and the database holds "
                    f"{encrypted} encrypted block document(s) that only it can read: restore "
                    "it from a backup (a new key is refused, it would make them unreadable)"
                )
        key = on_file or db_key or Fernet.generate_key().decode()
        if db_key is not None and db_key != key:
            raise EncryptionKeyError(f"{path} and the database hold different encryption keys")
        if on_file is None:
            create_new(path, (key + "\n").encode(), mode=0o600)  # never over an existing file
        if db_key is not None:
            await configuration.delete_configuration(session, DB_KEY)  # type: ignore[attr-defined]
    return "moved" if db_key else "created"


def main() -> int:
    home = data_dir(create=True)
    try:
        outcome = asyncio.run(move_key_out_of_database(home))
    except (EncryptionKeyError, OSError) as exc:
        print(first_line(exc), file=sys.stderr)  # the parent's error line
        return 1
    print(f"encryption key {outcome}: {home / KEY_FILE}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
