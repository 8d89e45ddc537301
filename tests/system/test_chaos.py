"""Chaos (issue 17): ``serve`` as an unprivileged user, 50 good cases and one of every hostile
entry of outgoing/ among them. Every good case reaches success/ and its target within 120 s,
every bad entry ends where it must, and the service never restarts.

| entry | ends |
| task.json: link, FIFO, device, > 16 MiB, too deep, not UTF-8, invalid | error/, with the reason |
| .processing: link, FIFO, device, > 64 KiB | a foreign claim: left exactly as it is |
| a folder the service cannot read or write | stays where it is, untouched |
| folders that vanish or are renamed while scanned | ignored |

CI runs as root (permission bits would not stop the service) in a fresh clone whose parents may
be private: the service runs as ``nobody``, and the folders above this Python and the checkout
are made traversable for the test's duration.
"""

from __future__ import annotations

import contextlib
import json
import os
import pwd
import shutil
import stat
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import psutil
import pytest

from blocks.folder import FolderTarget
from tasks.casefolder import PROCESSING, REASON_FILE
from tests.cases import make_case, task_json
from tests.dispatch_env import DispatchEnv
from tests.peers.net import free_port
from tests.service import run_cli, start_serve, stop, wait_for
from tests.system.test_metrics import scrape

GOOD_CASES = 50
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def service_user() -> pwd.struct_passwd:
    if os.geteuid() != 0:
        pytest.skip("the chaos test switches to an unprivileged user: it needs root")
    try:
        return pwd.getpwnam("nobody")
    except KeyError:
        pytest.skip("no user 'nobody' to run the service as")


@pytest.fixture
def chaos_root() -> Iterator[Path]:
    """A folder every user can reach (pytest's tmp_path is private to root), removed after."""
    root = Path(tempfile.mkdtemp(prefix="dicom-dispatch-chaos-"))
    root.chmod(0o755)
    try:
        yield root
    finally:
        for folder in root.rglob("*"):  # the 000 folder of the test: removable again
            if folder.is_dir() and not folder.is_symlink():
                folder.chmod(0o755)
        shutil.rmtree(root, ignore_errors=True)


@contextlib.contextmanager
def traversable(paths: list[Path]) -> Iterator[None]:
    """Every folder above ``paths`` searchable by others (``o+x``), as long as the block runs."""
    changed: list[tuple[Path, int]] = []
    folders = {parent for path in paths for parent in path.parents}
    try:
        for folder in sorted(folders, key=lambda p: len(p.parts)):
            mode = stat.S_IMODE(folder.stat().st_mode)
            if not mode & stat.S_IXOTH:
                folder.chmod(mode | stat.S_IXOTH)
                changed.append((folder, mode))
        yield
    finally:
        for folder, mode in reversed(changed):
            folder.chmod(mode)


def as_user(user: pwd.struct_passwd) -> dict[str, object]:
    return {"user": user.pw_uid, "group": user.pw_gid, "extra_groups": []}


def give(path: Path, user: pwd.struct_passwd) -> None:
    os.chown(path, user.pw_uid, user.pw_gid, follow_symlinks=False)
    for entry in path.rglob("*"):
        os.chown(entry, user.pw_uid, user.pw_gid, follow_symlinks=False)


# --------------------------------------------------------------------------------------------
# the hostile entries: each plants itself in a new case folder, and says how it must end


def valid_task(case: Path) -> None:
    (case / "task.json").write_text(json.dumps(task_json(case.name, ["share"])))


def bad_task(write: Callable[[Path], None]) -> Callable[[Path], None]:
    def plant(case: Path) -> None:
        write(case / "task.json")

    return plant


def deep_task(task: Path) -> None:
    task.write_text("[" * 200_000)


def huge_task(task: Path) -> None:
    raw = task_json(task.parent.name, ["share"])
    raw["padding"] = "x" * (16 * 2**20 + 1)
    task.write_text(json.dumps(raw))


def latin1_task(task: Path) -> None:
    raw = json.dumps(task_json(task.parent.name, ["share"], acc="M\u00fcller"), ensure_ascii=False)
    task.write_bytes(raw.encode("latin-1"))


#: name -> (plant into the case folder, what error/<name>/dispatch_error.txt must say)
TASK_JSON_ENTRIES: dict[str, tuple[Callable[[Path], None], str]] = {
    "task-link": (bad_task(lambda t: t.symlink_to("/etc/hostname")), "symbolic link"),
    "task-fifo": (bad_task(os.mkfifo), "not a regular file"),
    "task-device": (
        bad_task(lambda t: os.mknod(t, stat.S_IFCHR | 0o666, os.makedev(1, 3))),
        "not a regular file",
    ),
    "task-huge": (bad_task(huge_task), "larger than 16 MiB"),
    "task-deep": (bad_task(deep_task), "nested deeper than"),
    "task-latin1": (bad_task(latin1_task), "not UTF-8"),
    "task-invalid": (bad_task(lambda t: t.write_text('{"id": "x"}')), "invalid format"),
}


def claim_entry(write: Callable[[Path], None]) -> Callable[[Path], None]:
    def plant(case: Path) -> None:
        valid_task(case)
        write(case / PROCESSING)

    return plant


CLAIM_ENTRIES: dict[str, Callable[[Path], None]] = {
    "claim-zero": claim_entry(lambda m: m.symlink_to("/dev/zero")),
    "claim-fifo": claim_entry(os.mkfifo),
    "claim-device": claim_entry(lambda m: os.mknod(m, stat.S_IFCHR | 0o666, os.makedev(1, 5))),
    "claim-huge": claim_entry(lambda m: m.write_bytes(b"{" + b" " * 2**17 + b"}")),
}


def churn(outgoing: Path, user: pwd.struct_passwd, done: threading.Event) -> None:
    """Folders that appear, are renamed and vanish while the service scans (a producer's
    temporary folders): never to be dispatched or quarantined."""
    i = 0
    while not done.is_set():
        first = outgoing / f"churn-{i}"
        first.mkdir()
        (first / "part.dcm").write_bytes(b"\0" * 256)
        give(first, user)
        time.sleep(0.05)
        second = first.rename(outgoing / f"churn-{i}-renamed")
        time.sleep(0.05)
        shutil.rmtree(second)
        i += 1
        time.sleep(0.1)


def warnings(log: Path) -> str:
    """The service's warnings and errors: what a failure needs to be understood from CI."""
    lines = log.read_text(errors="replace").splitlines()
    worth = [
        line
        for line in lines
        if ("WARNING" in line or "ERROR" in line or "Trace" in line) and "churn" not in line
    ]
    return "\n".join(["service warnings:", *worth[-80:]])


# --------------------------------------------------------------------------------------------


@pytest.mark.timeout(300)
def test_hostile_entries_cost_only_themselves(
    env: DispatchEnv, service_user: pwd.struct_passwd, chaos_root: Path
) -> None:
    """SLOW (about a minute): the service as ``nobody`` among every kind of hostile entry."""
    root = chaos_root
    folders = {name: root / name for name in ("outgoing", "success", "error", "share", "home")}
    for folder in folders.values():
        folder.mkdir()
        give(folder, service_user)
    outgoing, success, error = folders["outgoing"], folders["success"], folders["error"]
    env.save_settings(
        outgoing_folder=str(outgoing),
        success_folder=str(success),
        error_folder=str(error),
        invalid_grace_seconds=3,
        dispatcher_scan_interval=0.5,
        retry_max=1,  # a good case must not need a second attempt
    )
    env.save_target(FolderTarget(folder=str(folders["share"])), "share")
    staging = root / "staging"  # cases are built here, then renamed into outgoing/ whole
    staging.mkdir()

    def drop(name: str, plant: Callable[[Path], None], mode: int | None = None) -> Path:
        case = staging / name
        case.mkdir()
        plant(case)
        if mode is None:
            give(case, service_user)
        else:
            case.chmod(mode)  # stays root's
        return case.rename(outgoing / name)

    tasks = {name: drop(name, plant) for name, (plant, _) in TASK_JSON_ENTRIES.items()}
    claims = {name: drop(name, plant) for name, plant in CLAIM_ENTRIES.items()}
    markers = {name: os.lstat(case / PROCESSING) for name, case in claims.items()}
    unreadable = drop("folder-unreadable", valid_task, mode=0o000)
    unwritable = drop("folder-unwritable", valid_task, mode=0o755)

    metrics_port = free_port()
    proc_env = {
        **os.environ,
        "DICOM_DISPATCH_HOME": str(folders["home"]),
        "PREFECT_HOME": str(folders["home"] / "prefect"),
        "HOME": str(folders["home"]),
        "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
        "DICOM_DISPATCH_METRICS_PORT": str(metrics_port),
    }
    python = Path(sys.executable)
    reach = [python, python.resolve(), Path(sys.prefix), Path(sys.base_prefix), REPO]
    done = threading.Event()
    churner = threading.Thread(target=churn, args=(outgoing, service_user, done), daemon=True)
    with traversable([p / "x" for p in reach]):
        probe = subprocess.run(
            [sys.executable, "-c", "import deployments.cli"],
            env=proc_env,
            capture_output=True,
            text=True,
            **as_user(service_user),  # type: ignore[arg-type]
        )
        if probe.returncode != 0:
            pytest.skip(f"the service user cannot run this Python: {probe.stderr[-500:]}")
        proc, log = start_serve(
            root,
            "--workers",
            "1",
            environ=proc_env,
            popen=as_user(service_user),
            DICOM_DISPATCH_HOME=proc_env["DICOM_DISPATCH_HOME"],
        )
        try:
            started = psutil.Process(proc.pid).create_time()
            churner.start()
            good: list[Path] = []
            for _ in range(GOOD_CASES):
                case = make_case(staging, ["share"], files=2)
                give(case, service_user)
                good.append(case.rename(outgoing / case.name))
            dropped = time.monotonic()
            try:
                wait_for(
                    lambda: all((success / c.name).is_dir() for c in good),
                    120,
                    "every good case in success/",
                )
                took = time.monotonic() - dropped
                wait_for(
                    lambda: all((error / name).is_dir() for name in tasks),
                    60,
                    "every bad task.json in error/",
                )
            except AssertionError as exc:
                left = [c.name for c in [*good, *tasks.values()] if (outgoing / c.name).exists()]
                raise AssertionError(f"{exc}: left {left}\n{warnings(log)}") from None
            done.set()
            churner.join(10)
            time.sleep(2)  # a few more scans over the entries that stay

            sample = scrape(metrics_port)
            status = run_cli("status", "--json", env=proc_env, **as_user(service_user))  # type: ignore[arg-type]
            assert proc.poll() is None, "the service must not have ended"
            assert psutil.Process(proc.pid).create_time() == started
        finally:
            done.set()
            if proc.poll() is None:
                stop(proc, log)
    print(f"{GOOD_CASES} good cases in success/ {took:.1f} s after they were dropped")
    # Every good case sent, once, whole.
    received = [f for f in folders["share"].rglob("*.dcm") if f.is_file()]
    assert len(received) == 2 * GOOD_CASES
    assert all((success / c.name / "task.json").is_file() for c in good)
    # Every bad task.json in error/, with its reason.
    for name, (_, why) in TASK_JSON_ENTRIES.items():
        assert why in (error / name / REASON_FILE).read_text(), name
    # Every odd claim left exactly as it was, its case where it was.
    for name, case in claims.items():
        assert os.lstat(case / PROCESSING) == markers[name], name
    # The folders the service cannot read or write: untouched.
    for case in (unreadable, unwritable):
        assert sorted(p.name for p in case.iterdir()) == ["task.json"], case.name
    # The churn: neither sent nor quarantined.
    assert not [p for p in (*success.iterdir(), *error.iterdir()) if "churn" in p.name]
    # Counted as invalid by status and the metrics (4 claims, 2 folders).
    assert status.returncode == 0, status.stderr
    assert json.loads(status.stdout)["outgoing"]["invalid"] == 6
    assert sample[("dicom_dispatch_queue_depth", (("folder", "invalid"),))] == 6
    assert "Traceback" not in log.read_text(errors="replace")
