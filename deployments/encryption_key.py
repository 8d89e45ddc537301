"""The block-secret encryption key, kept outside the database it protects.

Prefect encrypts block secrets (target passwords, keys) with a Fernet key that, by default, it
stores in the same database as the secrets: a copy of the database is a copy of the passwords.
For the database we run (embedded PostgreSQL or our SQLite file), the key lives in a 0600 file
in the data directory instead and every server we start gets it as
``PREFECT_SERVER_ENCRYPTION_KEY``. On the first start after an upgrade the key Prefect stored is
copied to that file and then deleted from the database, so existing secrets still decrypt.

The move runs once, in a child process (``python -m deployments.encryption_key``): it needs
Prefect's server database layer, which a service process should not carry for its lifetime.
A key the site sets itself (``PREFECT_SERVER_ENCRYPTION_KEY``) is left alone.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from pathlib import Path

from blocks.host import data_dir, write_private_file

__all__ = ["KEY_ENV", "KEY_FILE", "ensure_encryption_key", "move_key_out_of_database"]

KEY_FILE = "encryption-key"
KEY_ENV = "PREFECT_SERVER_ENCRYPTION_KEY"
DB_KEY = "ENCRYPTION_KEY"
MOVE_TIMEOUT = 300.0


def _read_key(path: Path) -> str | None:
    try:
        return path.read_text().strip() or None
    except OSError:
        return None


def ensure_encryption_key(home: Path) -> None:
    """Put the data directory's key in ``PREFECT_SERVER_ENCRYPTION_KEY`` (moved there first
    from the database on the first start). Call after the database URL is set."""
    if os.environ.get(KEY_ENV) or os.environ.get("ORION_ENCRYPTION_KEY"):
        return
    path = home / KEY_FILE
    key = _read_key(path)
    if key is None:
        done = subprocess.run(
            [sys.executable, "-m", "deployments.encryption_key"],
            env={**os.environ, "DICOM_DISPATCH_HOME": str(home)},
            capture_output=True,
            text=True,
            timeout=MOVE_TIMEOUT,
            check=False,
        )
        key = _read_key(path)
        if done.returncode != 0 or key is None:
            tail = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["no output"]
            raise RuntimeError(f"could not set up the encryption key in {path}: {tail[0]}")
    os.environ[KEY_ENV] = key


async def move_key_out_of_database(home: Path) -> str:
    """Copy the key Prefect stored in the database to the key file, then delete it there.

    The schema is migrated first (the server would do it on start anyway), so "no key in the
    database" is an answer, not a missing table. A fresh database gets a new key. The file is
    written before the row is deleted: a crash in between leaves both, never neither.
    """
    from cryptography.fernet import Fernet
    from prefect.server.database import provide_database_interface
    from prefect.server.models import configuration

    db = provide_database_interface()
    await db.create_db()
    path = home / KEY_FILE
    async with db.session_context(begin_transaction=True) as session:
        stored = await configuration.read_configuration(session, DB_KEY)  # type: ignore[attr-defined]
        db_key = str(stored.value["fernet_key"]) if stored is not None else None
        key = _read_key(path) or db_key or Fernet.generate_key().decode()
        if db_key is not None and db_key != key:
            raise RuntimeError(f"{path} and the database hold different encryption keys")
        if _read_key(path) is None:
            write_private_file(path, key + "\n")
        if db_key is not None:
            await configuration.delete_configuration(session, DB_KEY)  # type: ignore[attr-defined]
    return "moved" if db_key else "created"


def main() -> int:
    home = data_dir(create=True)
    outcome = asyncio.run(move_key_out_of_database(home))
    print(f"encryption key {outcome}: {home / KEY_FILE}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
