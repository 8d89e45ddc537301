"""No symlink surprises, no folder outside the queue: what a case folder can make us do.

A case folder is written by others: a link in it must not make us send, or overwrite, what it
points to, and a ``dispatch-case`` run may only take cases from outgoing/ or error/.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from blocks._dcmsend_report import parse_report
from blocks.dicom import DicomTarget
from blocks.folder import FolderTarget
from tasks.safefiles import LINK_REFUSED
from tests.cases import make_case
from tests.dispatch_env import DispatchEnv
from tests.peers.dcmtk import StoreSCP

SECRET = b"root:x:0:0:secret bytes no target may ever hold\n"


def _every_file(folder: Path) -> list[Path]:
    return [p for p in folder.rglob("*") if p.is_file()] if folder.exists() else []


def _holds(folder: Path, data: bytes) -> bool:
    return any(data in p.read_bytes() for p in _every_file(folder))


def test_a_linked_file_sends_the_case_to_error_and_nowhere_else(
    env: DispatchEnv, tmp_path: Path
) -> None:
    share = tmp_path / "share"
    secret = tmp_path / "secret"
    secret.write_bytes(SECRET)
    with StoreSCP(tmp_path / "pacs") as scp:
        env.save_target(FolderTarget(folder=str(share)), "share")
        env.save_target(DicomTarget(ip="127.0.0.1", port=str(scp.port), aet_target="X"), "pacs")
        case = make_case(env.outgoing, ["share", "pacs"])
        (case / "x.dcm").symlink_to("/etc/passwd")
        (case / "y.dcm").symlink_to(secret)

        result = env.dispatch(case)

        assert not scp.received()
        assert not _holds(tmp_path / "pacs", SECRET)
    assert result["location"] == "error", result
    assert LINK_REFUSED in result["reason"]
    failed = env.error / case.name
    reason = (failed / "dispatch_error.txt").read_text()
    assert "symbolic link" in reason
    assert env.task(failed)["info"]["fail_reason"] == reason.strip()
    assert not _every_file(share), "the Folder target got something"
    assert (failed / "x.dcm").is_symlink(), "nothing is lost: the link stays as it was"


def test_links_inside_the_case_only_when_the_site_allows(env: DispatchEnv, tmp_path: Path) -> None:
    """With ``case_links_inside`` a link to a file of the case is sent as that file; a planted
    link at our report's name is replaced, never written through."""
    env.save_settings(case_links_inside=True)
    with StoreSCP(tmp_path / "pacs") as scp:
        env.save_target(DicomTarget(ip="127.0.0.1", port=str(scp.port), aet_target="X"), "pacs")
        case = make_case(env.outgoing, ["pacs"], files=2)
        first = sorted(case.glob("*.dcm"))[0]
        original = first.read_bytes()
        (case / "sent.txt").symlink_to(first.name)  # where our dcmsend report goes

        result = env.dispatch(case)

        assert result["location"] == "success", result
        assert len(scp.received()) == 2
    done = env.success / case.name
    assert (done / first.name).read_bytes() == original
    assert not (done / "sent.txt").is_symlink()
    assert parse_report((done / "sent.txt").read_text())["summary"]["sop_instances"] == 2

    outside = make_case(env.outgoing, ["pacs"], files=1)
    (outside / "z.dcm").symlink_to(tmp_path / "secret-elsewhere")
    refused = env.dispatch(outside)
    assert refused["location"] == "error"
    assert "leads outside the case folder" in refused["reason"]


def test_planted_links_at_our_file_names_leave_their_targets_alone(
    env: DispatchEnv, tmp_path: Path
) -> None:
    victims = {
        name: tmp_path / f"victim-{i}"
        for i, name in enumerate(
            ["dispatch_error.txt", f".processing.{os.getpid()}.tmp", ".task.json.tmp"]
        )
    }
    for victim in victims.values():
        victim.write_bytes(SECRET)
    env.save_target(FolderTarget(folder=str(tmp_path / "share")), "share")
    case = make_case(env.outgoing, ["share"])
    for name, victim in victims.items():
        (case / name).symlink_to(victim)

    result = env.dispatch(case)

    assert result["location"] == "error"  # the planted links themselves are refused
    for victim in victims.values():
        assert victim.read_bytes() == SECRET
    failed = env.error / case.name
    assert not (failed / "dispatch_error.txt").is_symlink()
    assert LINK_REFUSED in (failed / "dispatch_error.txt").read_text()


def test_a_linked_task_json_is_refused(env: DispatchEnv, tmp_path: Path) -> None:
    env.save_target(FolderTarget(folder=str(tmp_path / "share")), "share")
    case = make_case(env.outgoing, ["share"])
    real = tmp_path / "task.json"
    (case / "task.json").rename(real)
    (case / "task.json").symlink_to(real)
    before = real.read_bytes()

    result = env.dispatch(case)

    assert result["location"] == "error"
    assert "task.json is a symbolic link" in result["reason"]
    assert real.read_bytes() == before


def test_dispatch_case_takes_no_folder_outside_the_queue(env: DispatchEnv, tmp_path: Path) -> None:
    env.save_target(FolderTarget(folder=str(tmp_path / "share")), "share")
    elsewhere = make_case(tmp_path / "elsewhere", ["share"])
    snapshot = {p.name: p.read_bytes() for p in elsewhere.iterdir()}
    (env.outgoing / "sneaky").symlink_to(elsewhere)

    for case in (str(elsewhere), str(env.outgoing / "sneaky"), "sneaky", f"../{elsewhere.name}"):
        result = env.dispatch(case)
        assert result["location"] not in ("success", "error", "outgoing"), (case, result)
        assert "not a case" in result["reason"] or "no case folder" in result["reason"]

    assert {p.name: p.read_bytes() for p in elsewhere.iterdir()} == snapshot
    assert not list(env.error.iterdir())
    assert not (tmp_path / "share").exists()
    assert json.loads(snapshot["task.json"])["id"] == elsewhere.name
