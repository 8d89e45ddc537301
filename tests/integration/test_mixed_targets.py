"""One case, five targets of five types, one of which fails first: only that one is re-sent."""

from __future__ import annotations

from pathlib import Path

from blocks.dicom import DicomTarget
from blocks.dicomweb import DicomWebTarget
from blocks.folder import FolderTarget
from blocks.s3 import S3Target
from blocks.sftp import SftpTarget
from tests.cases import make_case
from tests.dicomfiles import pixel_digest
from tests.dispatch_env import DispatchEnv
from tests.peers.dcmtk import StoreSCP
from tests.peers.net import free_port
from tests.peers.orthanc import Orthanc
from tests.peers.s3 import MotoS3
from tests.peers.sshd import SshServer


def test_five_types_one_failing_resends_only_that_one(env: DispatchEnv, tmp_path: Path) -> None:
    env.save_settings(retry_max=5, retry_delay=0.0)
    remote = tmp_path / "sftp-remote"
    remote.mkdir()
    with (
        StoreSCP(tmp_path / "pacs") as scp,
        MotoS3(tmp_path / "moto") as moto,
        SshServer(tmp_path / "sshd") as sshd,
        Orthanc(tmp_path / "orthanc", dicom_server=False) as orthanc,
    ):
        bucket = moto.create_bucket("mixed", versioned=True)
        env.save_target(DicomTarget(ip="127.0.0.1", port=str(scp.port), aet_target="X"), "m_pacs")
        env.save_target(FolderTarget(folder=str(tmp_path / "share")), "m_share")
        env.save_target(
            S3Target.model_validate(
                {
                    "region": "us-east-1",
                    "bucket": bucket,
                    "prefix": "in",
                    "access_key_id": moto.access_key_id,
                    "secret_access_key": moto.secret_access_key,
                    "endpoint_url": moto.endpoint,
                }
            ),
            "m_s3",
        )
        env.save_target(SftpTarget.model_validate(sshd.target_fields(folder=str(remote))), "m_sftp")
        down = f"http://127.0.0.1:{free_port()}/dicom-web"
        env.save_target(DicomWebTarget(url=down, connect_timeout=2), "m_web")
        names = ["m_pacs", "m_share", "m_s3", "m_sftp", "m_web"]
        case = make_case(env.outgoing, names, files=4)
        sent = dict(pixel_digest(p) for p in case.glob("*.dcm"))

        first = env.dispatch(case)

        assert first["location"] == "outgoing"
        status = env.task(case)["dispatch"]["status"]
        assert {n: status[n]["state"] for n in names} == {
            "m_pacs": "complete",
            "m_share": "complete",
            "m_s3": "complete",
            "m_sftp": "complete",
            "m_web": "error",
        }
        pacs_files = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "pacs").iterdir()}
        sftp_writes = len(sshd.written(remote))

        env.save_target(DicomWebTarget(url=orthanc.dicomweb_url), "m_web")
        second = env.dispatch(case)

        assert second["location"] == "success", second
        assert set(orthanc.instances()) == set(sent)
        # Nothing was sent again to the four targets that already had the case.
        assert {p.name: p.stat().st_mtime_ns for p in (tmp_path / "pacs").iterdir()} == pacs_files
        assert len(list((tmp_path / "share").iterdir())) == 1
        assert set(moto.versions(bucket).values()) == {1}
        assert len(sshd.written(remote)) == sftp_writes
        assert {uid: pixel_digest(p)[1] for uid, p in scp.received().items()} == sent
