"""Links planted in a case after the pre-send check, or at any new name while a send runs.

The check before a send (``case_links_problem``) sees the case as it was; whoever can write the
case folder can plant a link a moment later. Every sender must then refuse the link (the case
goes to error/ with the file named) and never deliver, or write, what it points to.
"""

from __future__ import annotations

import io
import os
import stat
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
from pydicom import dcmread

from blocks.base import DispatchTarget, SendContext
from blocks.dicom import DicomTarget
from blocks.dicomweb import DicomWebTarget
from blocks.errors import TargetError
from blocks.folder import FolderTarget
from blocks.rsync import RsyncTarget
from blocks.sftp import SftpTarget
from tasks.safefiles import LINK_REFUSED, case_links_problem
from tasks.taskjson import read_task
from tests.cases import make_case
from tests.dispatch_env import DispatchEnv
from tests.integration.ssh_targets import ssh_target
from tests.integration.test_target_s3 import bucket_name, s3_target
from tests.integration.test_target_xnat import xnat_target
from tests.peers.base import require_program
from tests.peers.dcmtk import StoreSCP, dcmtk_binary
from tests.peers.orthanc import Orthanc
from tests.peers.s3 import MotoS3
from tests.peers.xnat_fake import XnatFake

pytestmark = pytest.mark.timeout(180)

NAME = "late"
SENDERS = ["folder", "sftp", "rsync", "s3", "dicomweb", "xnat", "dicom", "dcmsend"]


@dataclass
class Peer:
    """A target and what its peer holds: the SOP Instance UIDs that arrived there."""

    target: DispatchTarget
    arrived: Callable[[], set[str]]


def uid_of(data: bytes) -> str | None:
    try:
        return str(dcmread(io.BytesIO(data), stop_before_pixels=True).SOPInstanceUID)
    except Exception:  # .complete, task.json, ...: not DICOM
        return None


def uids_in(folder: Path) -> set[str]:
    found = (uid_of(p.read_bytes()) for p in folder.rglob("*") if p.is_file())
    return {uid for uid in found if uid}


@pytest.fixture(scope="module")
def moto(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MotoS3]:
    with MotoS3(tmp_path_factory.mktemp("moto")) as server:
        yield server


@pytest.fixture(scope="module")
def orthanc(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Orthanc]:
    with Orthanc(tmp_path_factory.mktemp("orthanc"), dicom_server=False) as server:
        yield server


@pytest.fixture
def peer(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Peer]:
    """The sender named by the test's parameter, against its real peer on 127.0.0.1."""
    kind: str = request.param
    remote = tmp_path / "remote"
    if kind == "folder":
        yield Peer(FolderTarget(folder=str(remote)), lambda: uids_in(remote))
    elif kind in ("sftp", "rsync"):
        if kind == "rsync":
            require_program("rsync", "rsync")
        ssh_kind = SftpTarget if kind == "sftp" else RsyncTarget
        server = request.getfixturevalue("sshd")
        yield Peer(ssh_target(ssh_kind, server, remote), lambda: uids_in(remote))
    elif kind == "s3":
        moto: MotoS3 = request.getfixturevalue("moto")
        bucket = moto.create_bucket(bucket_name())
        found = lambda: {u for u in map(uid_of, moto.objects(bucket).values()) if u}  # noqa: E731
        yield Peer(s3_target(moto, bucket), found)
    elif kind == "dicomweb":
        orthanc: Orthanc = request.getfixturevalue("orthanc")
        target = DicomWebTarget(url=orthanc.dicomweb_url)
        yield Peer(target, lambda: set(orthanc.instances()))
    elif kind == "xnat":
        with XnatFake(tmp_path / "xnat") as fake:
            yield Peer(
                xnat_target(fake),
                lambda: {u for up in fake.uploads for u in map(uid_of, up.members().values()) if u},
            )
    else:
        if kind == "dcmsend":
            dcmtk_binary("dcmsend")
        with StoreSCP(tmp_path / "pacs") as scp:
            target = DicomTarget(
                ip="127.0.0.1",
                port=str(scp.port),
                aet_target="STORESCP",
                backend="dcmsend" if kind == "dcmsend" else "pynetdicom",
            )
            yield Peer(target, lambda: set(scp.received()))
    # A send that failed may have left the peer a moment to finish writing what it took.


def elsewhere(tmp_path: Path) -> tuple[Path, str]:
    """A DICOM file outside any case (what a planted link points to) and its UID."""
    folder = make_case(tmp_path / "elsewhere", [NAME], files=1)
    victim = next(folder.glob("*.dcm"))
    uid = uid_of(victim.read_bytes())
    assert uid
    return victim, uid


def swap_for_link(path: Path, target: Path) -> None:
    """Replace ``path`` by a symbolic link to ``target`` in one step (a rename)."""
    temporary = path.with_name(f".plant-{uuid.uuid4().hex}")
    temporary.symlink_to(target)
    os.replace(temporary, path)


@pytest.mark.parametrize("peer", SENDERS, indirect=True)
def test_a_link_planted_after_the_check_is_never_delivered(peer: Peer, tmp_path: Path) -> None:
    case = make_case(tmp_path / "outgoing", [NAME], files=3)
    victim, victim_uid = elsewhere(tmp_path)
    swapped = sorted(case.glob("*.dcm"))[0]
    assert case_links_problem(case) is None  # the pre-send check saw no link
    swap_for_link(swapped, victim)  # ... and one is planted right after it
    _, task = read_task(case)
    peer.target.target_name = NAME

    with pytest.raises(TargetError, match=swapped.name):
        peer.target.send(SendContext(case, task, case / "sent.txt"))

    assert victim_uid not in peer.arrived()
    assert swapped.is_symlink(), "nothing in the case was changed"


@pytest.mark.parametrize("peer", ["folder", "dicom", "dcmsend"], indirect=True)
def test_a_case_whose_file_became_a_link_goes_to_error_with_the_file_named(
    peer: Peer, env: DispatchEnv, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Through ``dispatch_case``: the link is planted just after the flow's own check."""
    import flows.dispatch

    env.save_target(peer.target, NAME)
    case = make_case(env.outgoing, [NAME], files=3)
    victim, victim_uid = elsewhere(tmp_path)
    swapped = sorted(case.glob("*.dcm"))[0]
    check = flows.dispatch.case_links_problem

    def check_then_plant(case_dir: Path, *, allow_inside: bool = False) -> str | None:
        found = check(case_dir, allow_inside=allow_inside)
        if not swapped.is_symlink():
            swap_for_link(swapped, victim)
        return found

    monkeypatch.setattr(flows.dispatch, "case_links_problem", check_then_plant)

    result = env.dispatch(case)

    assert victim_uid not in peer.arrived()
    assert result["location"] == "error", result
    assert LINK_REFUSED in result["reason"]
    assert swapped.name in result["reason"]
    failed = env.error / case.name
    assert (failed / swapped.name).is_symlink(), "nothing is lost: the link stays as it was"


@contextmanager
def planting_links(folder: Path, victim: Path) -> Iterator[list[str]]:
    """While active, every new name in ``folder`` is replaced by a link to ``victim`` as soon
    as inotify reports it (even a name that was created and removed at once)."""
    from watchfiles import Change, watch

    stop = threading.Event()
    armed = threading.Event()
    planted: list[str] = []
    probe = folder / f".probe-{uuid.uuid4().hex}"

    def run() -> None:
        for changes in watch(folder, stop_event=stop, debounce=20, step=1, recursive=False):
            for change, where in changes:
                name = Path(where).name
                if Path(where) == probe:
                    armed.set()
                elif change == Change.added and not name.startswith((".plant-", ".probe-")):
                    if name not in planted:
                        planted.append(name)
                        swap_for_link(folder / name, victim)

    thread = threading.Thread(target=run, name="planter", daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not armed.is_set() and time.monotonic() < deadline:
        probe.touch()
        probe.unlink()
        armed.wait(0.1)
    assert armed.is_set(), "the watcher did not start"
    try:
        yield planted
    finally:
        stop.set()
        thread.join(10)


@pytest.mark.parametrize("peer", ["dcmsend", "dicom"], indirect=True)
def test_a_link_at_every_new_name_during_a_send_leaves_its_target_unchanged(
    peer: Peer, tmp_path: Path
) -> None:
    case = make_case(tmp_path / "outgoing", [NAME], files=20, rows=256, cols=256)
    victim = tmp_path / "site-packages" / "evil.pth"
    victim.parent.mkdir()
    victim.write_bytes(b"# the victim's bytes\n")
    victim.chmod(0o600)
    _, task = read_task(case)
    peer.target.target_name = NAME

    with planting_links(case, victim) as planted:
        try:
            peer.target.send(SendContext(case, task, case / "sent.txt"))
        except TargetError:
            pass  # a report replaced by a link is not ours to judge here
        time.sleep(0.2)  # names created at the very end are planted too

    assert planted, "the send created no name in the case folder: nothing was tried"
    assert victim.read_bytes() == b"# the victim's bytes\n", planted
    assert stat.S_IMODE(victim.stat().st_mode) == 0o600, "not even its mode"
