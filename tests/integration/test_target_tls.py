"""DICOM+TLS targets against DCMTK ``storescp +tls``, with a throw-away CA made per module."""

from __future__ import annotations

import asyncio
import datetime as dt
import ipaddress
import json
import shutil
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from blocks.dicom import DicomTLSTarget
from tests.cases import make_case, nest_first_file
from tests.dicomfiles import pixel_digests
from tests.dispatch_env import DispatchEnv
from tests.peers.dcmtk import StoreSCP
from tests.peers.net import free_port

Issuer = tuple[ec.EllipticCurvePrivateKey, x509.Certificate]


@dataclass(frozen=True)
class Pair:
    key: Path
    cert: Path


@dataclass(frozen=True)
class PKI:
    ca: Path  # the CA everybody trusts
    other_ca: Path  # a CA nobody here uses
    server: Pair  # storescp, for 127.0.0.1 and localhost
    elsewhere_server: Pair  # signed by ca, but for another host name only
    expired_server: Pair
    client: Pair  # ours, signed by ca
    rogue_client: Pair  # signed by other_ca: storescp refuses it

    def scp(self, server: Pair | None = None) -> tuple[Path, Path, Path]:
        chosen = server or self.server
        return chosen.key, chosen.cert, self.ca


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _write(
    folder: Path, stem: str, key: ec.EllipticCurvePrivateKey, cert: x509.Certificate
) -> Pair:
    pair = Pair(folder / f"{stem}.key", folder / f"{stem}.pem")
    pair.key.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    pair.cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return pair


def _ca(folder: Path, stem: str) -> tuple[Issuer, Path]:
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(f"{stem} (test only)"))
        .issuer_name(_name(f"{stem} (test only)"))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(days=1))
        .not_valid_after(now + dt.timedelta(days=7))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return (key, cert), _write(folder, stem, key, cert).cert


def _leaf(
    folder: Path,
    stem: str,
    issuer: Issuer,
    *,
    server: bool,
    expired: bool = False,
    names: list[x509.GeneralName] | None = None,
) -> Pair:
    issuer_key, issuer_cert = issuer
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    start, end = (now - dt.timedelta(days=1), now + dt.timedelta(days=7))
    if expired:
        start, end = now - dt.timedelta(days=30), now - dt.timedelta(days=1)
    usage = ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(stem))
        .issuer_name(issuer_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer_key.public_key()),
            critical=False,
        )
    )
    if server:
        names = names or [
            x509.DNSName("localhost"),
            x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
        ]
        builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
    return _write(folder, stem, key, builder.sign(issuer_key, hashes.SHA256()))


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> PKI:
    folder = tmp_path_factory.mktemp("pki")
    ca, ca_file = _ca(folder, "ca")
    other, other_file = _ca(folder, "other-ca")
    return PKI(
        ca=ca_file,
        other_ca=other_file,
        server=_leaf(folder, "server", ca, server=True),
        elsewhere_server=_leaf(
            folder, "elsewhere", ca, server=True, names=[x509.DNSName("pacs.elsewhere.example")]
        ),
        expired_server=_leaf(folder, "expired-server", ca, server=True, expired=True),
        client=_leaf(folder, "client", ca, server=False),
        rogue_client=_leaf(folder, "rogue-client", other, server=False),
    )


def tls_target(pki: PKI, port: int, **fields: object) -> DicomTLSTarget:
    values: dict[str, object] = {
        "ip": "127.0.0.1",
        "port": str(port),
        "aet_target": "STORESCP",
        "tls_key": str(pki.client.key),
        "tls_cert": str(pki.client.cert),
        "ca_cert": str(pki.ca),
        **fields,
    }
    return DicomTLSTarget.model_validate(values)


@contextmanager
def tls_scps(pki: PKI, folder: Path, *servers: Pair) -> Iterator[tuple[StoreSCP, ...]]:
    """One ``storescp +tls`` per server certificate, each storing into its own folder below
    ``folder``; all stopped when the ``with`` block ends."""
    with ExitStack() as stack:
        yield tuple(
            stack.enter_context(StoreSCP(folder / f"scp{i}", tls=pki.scp(server)))
            for i, server in enumerate(servers)
        )


def test_case_arrives_over_tls_recursively_with_report(
    env: DispatchEnv, pki: PKI, tmp_path: Path
) -> None:
    with StoreSCP(tmp_path / "pacs", tls=pki.scp()) as scp:
        target = tls_target(pki, scp.port, tls_check_hostname=True)
        assert target.test_connection() == {
            "ping": True,
            "c-echo": True,
            "err": "",
            "tls_verify": f"certificate verified against ca_cert {pki.ca}, host name checked",
        }
        env.save_target(target, "PACS_TLS")
        case = make_case(env.outgoing, ["PACS_TLS"], files=5, rows=64, cols=64)
        nest_first_file(case)  # mercure's storescu call was not recursive
        env.dispatch_delivered(case, "PACS_TLS", scp.received, instances=5)


def test_wrong_ca_and_expired_certificate_fail_with_clear_reasons(
    env: DispatchEnv, pki: PKI, tmp_path: Path
) -> None:
    env.save_settings(retry_max=3, retry_delay=600.0)
    with tls_scps(pki, tmp_path, pki.server, pki.expired_server) as (good, stale):
        wrong_ca = tls_target(pki, good.port, ca_cert=str(pki.other_ca))
        expired = tls_target(pki, stale.port)
        env.save_target(wrong_ca, "wrong_ca")
        env.save_target(expired, "expired")
        case = make_case(env.outgoing, ["wrong_ca", "expired"])

        started = time.monotonic()
        result = env.dispatch(case)

        assert time.monotonic() - started < 20
        assert result["location"] == "outgoing"
        assert good.received() == {}
        assert stale.received() == {}
        echo = wrong_ca.test_connection()
    status = env.task(case)["dispatch"]["status"]
    assert status["wrong_ca"]["state"] == "error"
    assert "certificate not accepted" in status["wrong_ca"]["message"]
    assert "ca_cert" in status["wrong_ca"]["message"]
    assert status["expired"]["state"] == "error"
    assert "certificate has expired" in status["expired"]["message"]
    assert echo["c-echo"] is False
    assert "certificate" in echo["err"]
    assert not DicomTLSTarget.connection_ok(echo)


def test_a_certificate_for_another_host_is_refused(
    pki: PKI, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With the system CA store (here: SSL_CERT_FILE naming our CA, as a public CA would be
    trusted) the host name is always checked; with ca_cert only when tls_check_hostname."""
    monkeypatch.setenv("SSL_CERT_FILE", str(pki.ca))
    with tls_scps(pki, tmp_path, pki.server, pki.elsewhere_server) as (right, wrong):
        system_store = tls_target(pki, wrong.port, ca_cert="")
        refused = system_store.test_connection()
        assert refused["c-echo"] is False
        assert "certificate not accepted" in refused["err"]
        assert "127.0.0.1" in refused["err"] or "hostname" in refused["err"].lower()
        assert refused["tls_verify"] == (
            "certificate verified against the system CA store, host name checked"
        )
        checked = tls_target(pki, wrong.port, tls_check_hostname=True).test_connection()
        assert checked["c-echo"] is False
        assert "certificate not accepted" in checked["err"]
        assert wrong.received() == {}

        accepted = tls_target(pki, right.port, ca_cert="").test_connection()
        assert accepted["c-echo"] is True, accepted
        dcmtk_like = tls_target(pki, wrong.port).test_connection()  # ca_cert, no host check
        assert dcmtk_like["c-echo"] is True, dcmtk_like
        assert dcmtk_like["tls_verify"].endswith("host name not checked")


def test_import_warns_of_a_target_tls_now_refuses(env: DispatchEnv) -> None:
    spec = {"target_type": "dicomtls", "ip": "10.1.2.3", "port": "2762", "aet_target": "PACS"}
    report = env.import_mercure_targets(
        {"by_ip": spec, "with_ca": {**spec, "ca_cert": "/etc/ca.pem"}}
    )
    assert set(report.imported) == {"by_ip", "with_ca"}
    assert list(report.warnings) == ["by_ip"]
    assert "no ca_cert" in report.warnings["by_ip"][0]


def test_peer_down_fails_quickly_and_keeps_the_case(env: DispatchEnv, pki: PKI) -> None:
    env.save_settings(retry_max=3, retry_delay=600.0)
    env.save_target(tls_target(pki, free_port(), connect_timeout=2), "tls_down")
    case = make_case(env.outgoing, ["tls_down"])
    started = time.monotonic()
    result = env.dispatch(case)
    assert time.monotonic() - started < 15
    assert result["location"] == "outgoing"
    assert len(list(case.glob("*.dcm"))) == 3, "nothing is lost"
    status = env.task(case)["dispatch"]["status"]["tls_down"]
    assert status["state"] == "error"
    assert "refused" in status["message"]


def test_refused_client_certificate_is_a_clear_error(
    env: DispatchEnv, pki: PKI, tmp_path: Path
) -> None:
    env.save_settings(retry_max=3, retry_delay=600.0)
    with StoreSCP(tmp_path / "pacs", tls=pki.scp()) as scp:
        rogue = tls_target(
            pki, scp.port, tls_key=str(pki.rogue_client.key), tls_cert=str(pki.rogue_client.cert)
        )
        env.save_target(rogue, "rogue")
        case = make_case(env.outgoing, ["rogue"])
        assert env.dispatch(case)["location"] == "outgoing"
        assert scp.received() == {}
    message = env.task(case)["dispatch"]["status"]["rogue"]["message"]
    assert "client certificate" in message
    key_pem = pki.rogue_client.key.read_text()
    assert "PRIVATE KEY" not in message
    assert key_pem.splitlines()[1] not in message


def test_retry_after_partial_delivery_sends_only_to_the_failed_target(
    env: DispatchEnv, pki: PKI, tmp_path: Path
) -> None:
    env.save_settings(retry_max=3, retry_delay=0.0)
    with tls_scps(pki, tmp_path, pki.server, pki.server) as (first, second):
        env.save_target(tls_target(pki, first.port), "tls_ok")
        env.save_target(tls_target(pki, second.port, ca_cert=str(pki.other_ca)), "tls_later")
        case = make_case(env.outgoing, ["tls_ok", "tls_later"])
        uids = set(pixel_digests(case))

        assert env.dispatch(case)["location"] == "outgoing"
        assert set(first.received()) == uids
        assert second.received() == {}
        shutil.rmtree(first.folder)
        first.folder.mkdir()
        env.save_target(tls_target(pki, second.port), "tls_later")  # CA fixed

        assert env.dispatch(case)["location"] == "success"
        assert first.received() == {}, "the complete target must not be sent again"
        assert set(second.received()) == uids
    status = env.task(env.success / case.name)["dispatch"]["status"]
    assert {name: s["state"] for name, s in status.items()} == {
        "tls_ok": "complete",
        "tls_later": "complete",
    }


def test_mercure_json_dicomtls_target_imports(env: DispatchEnv, tmp_path: Path) -> None:
    from blocks.registry import aload_target, forget_cached_targets
    from deployments.importer import import_mercure_config

    spec = {
        "target_type": "dicomtls",
        "ip": "pacs.example.org",
        "port": "2762",
        "aet_target": "PACS",
        "aet_source": "MERCURE",
        "pass_sender_aet": False,
        "pass_receiver_aet": False,
        "tls_key": "/etc/mercure/tls/client.key",
        "tls_cert": "/etc/mercure/tls/client.crt",
        "ca_cert": "/etc/mercure/tls/ca.crt",
        "contact": "",
        "comment": "",
        "direction": "push",
    }
    path = tmp_path / "mercure.json"
    path.write_text(json.dumps({"targets": {"PACS_TLS": spec}}))
    report = asyncio.run(import_mercure_config(path))
    assert report.imported == {"PACS_TLS": "dicomtls"}
    assert report.ignored_fields == {}
    forget_cached_targets()
    block = asyncio.run(aload_target("PACS_TLS"))
    assert isinstance(block, DicomTLSTarget)
    assert (block.ip, block.port, block.tls_key, block.ca_cert) == (
        "pacs.example.org",
        "2762",
        spec["tls_key"],
        spec["ca_cert"],
    )
