"""Our C-MOVE Storage SCP (blocks/_storage_scp.py) against real pynetdicom associations: it
listens on the route to the PACS only, takes associations from the PACS only (address and AE
title), with a bounded PDU and a bounded number of connections."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE

from blocks._association import DicomPeer
from blocks._receiver import Receiver
from blocks._storage_scp import MOVE_MAX_ASSOCIATIONS, MOVE_MAX_PDU, MoveSCP
from tests.dicomfiles import make_ct_series
from tests.peers.net import free_port

PACS_AET = "PACS"
OUR_AET = "DISPATCH"


@pytest.fixture
def scp(tmp_path: Path) -> Iterator[MoveSCP]:
    peer = DicomPeer(host="127.0.0.1", port=free_port(), called_aet=PACS_AET, calling_aet="X")
    receiver = Receiver(tmp_path / "in", set(), None, None)
    (tmp_path / "in").mkdir()
    with MoveSCP(OUR_AET, "", free_port(), receiver, peer=peer, port_wait=0) as server:
        yield server


def _associate(scp: MoveSCP, calling: str = PACS_AET, bind: str = "127.0.0.1") -> object:
    ae = AE(ae_title=calling)
    ae.add_requested_context(CTImageStorage, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
    ae.acse_timeout = ae.network_timeout = 5
    return ae.associate("127.0.0.1", scp.port, ae_title=OUR_AET, bind_address=(bind, 0))


def test_the_pacs_is_received_with_a_bounded_pdu(scp: MoveSCP, tmp_path: Path) -> None:
    assert scp.host == "127.0.0.1", "bound to the route to the PACS, not to every interface"
    source = tmp_path / "source"
    source.mkdir()
    make_ct_series(source, 1)
    [path] = list(source.glob("*.dcm"))
    assoc = _associate(scp)
    assert assoc.is_established  # type: ignore[attr-defined]
    assert assoc.acceptor.maximum_length == MOVE_MAX_PDU  # type: ignore[attr-defined]
    status = assoc.send_c_store(dcmread(path))  # type: ignore[attr-defined]
    assoc.release()  # type: ignore[attr-defined]
    assert status.Status == 0x0000
    assert list(scp.receiver.instances) == [str(dcmread(path).SOPInstanceUID)]


def test_another_ae_title_or_address_is_refused(scp: MoveSCP) -> None:
    other_aet = _associate(scp, calling="INTRUDER")
    assert not other_aet.is_established  # type: ignore[attr-defined]
    assert other_aet.is_rejected  # type: ignore[attr-defined]
    other_host = _associate(scp, bind="127.0.0.2")  # another address, the PACS's AE title
    assert not other_host.is_established  # type: ignore[attr-defined]
    assert not scp.receiver.instances


def test_at_most_a_few_associations_at_once(scp: MoveSCP) -> None:
    held = [_associate(scp) for _ in range(MOVE_MAX_ASSOCIATIONS)]
    assert all(a.is_established for a in held)  # type: ignore[attr-defined]
    extra = _associate(scp)
    assert not extra.is_established  # type: ignore[attr-defined]
    for assoc in held:
        assoc.release()  # type: ignore[attr-defined]
