"""A ``postmaster.pid`` left by a killed PostgreSQL does not stop the next start."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from deployments.service.database import remove_stale_postmaster_pid


def pid_file(pgdata: Path, pid: int) -> Path:
    pgdata.mkdir(exist_ok=True)
    path = pgdata / "postmaster.pid"
    path.write_text(f"{pid}\n{pgdata}\n1700000000\n5432\n{pgdata}\n\n  5432001  0\nready   \n")
    return path


def test_a_pid_now_used_by_another_live_process_is_stale(tmp_path: Path) -> None:
    path = pid_file(tmp_path / "postgres", os.getpid())  # alive, but no postgres
    remove_stale_postmaster_pid(tmp_path / "postgres")
    assert not path.exists()


def test_the_socket_lock_of_a_killed_postmaster_goes_too(tmp_path: Path) -> None:
    """The socket's lock file names the killed postmaster's pid, now another process's."""
    path = pid_file(tmp_path / "postgres", os.getpid())
    lock = tmp_path / "postgres" / ".s.PGSQL.5432.lock"
    lock.write_text(f"{os.getpid()}\n{tmp_path / 'postgres'}\n")
    remove_stale_postmaster_pid(tmp_path / "postgres")
    assert not path.exists()
    assert not lock.exists()


def test_a_dead_pid_is_stale(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        check=True,
        capture_output=True,
        text=True,
    )
    path = pid_file(tmp_path / "postgres", int(done.stdout))
    remove_stale_postmaster_pid(tmp_path / "postgres")
    assert not path.exists()


def test_a_live_postgres_of_this_data_dir_keeps_its_file(tmp_path: Path) -> None:
    """A process named ``postgres``, running in the data directory as its owner: kept."""
    pgdata = tmp_path / "postgres"
    pgdata.mkdir()
    fake = tmp_path / "postgres-bin"
    fake.mkdir()
    (fake / "postgres").symlink_to("/bin/sleep")
    proc = subprocess.Popen([str(fake / "postgres"), "30"], cwd=pgdata)
    try:
        path = pid_file(pgdata, proc.pid)
        remove_stale_postmaster_pid(pgdata)
        assert path.exists()
    finally:
        proc.kill()
        proc.wait()
    remove_stale_postmaster_pid(pgdata)
    assert not path.exists(), "gone once that postgres is"


def test_no_file_nothing_to_do(tmp_path: Path) -> None:
    (tmp_path / "postgres").mkdir()
    remove_stale_postmaster_pid(tmp_path / "postgres")
    assert not (tmp_path / "postgres" / "postmaster.pid").exists()
