"""``serve --api-processes 2 --workers 2``: Prefect's multi-process server on Redis, black box.

One service for the whole module (its own PostgreSQL, Redis, two API processes, the services
process, two dispatchers), used in order: cases reach a DCMTK storescp and a target limited to
one send at a time gets exactly that across both dispatchers; a killed API process and a killed
services process come back and cases go on; Redis killed while sends hold their slots comes
back with the leases, so the slots are all given back; SIGTERM ends every process within 15 s.
What the peers received and which processes run is what counts, never a log line.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import psutil
import pytest

from tests.cases import make_case
from tests.peers.counting_scp import CountingSCP, counting_scp
from tests.peers.dcmtk import StoreSCP
from tests.service import free_port, run_as_client, start_serve, stop, wait_for
from tests.system.test_service_hardening import basic, request, restarts
from tests.system.test_stop_and_start import STOP_PROMISE, describe, every_process, running_after

pytestmark = pytest.mark.timeout(300)
#: Seconds for the slots of finished sends to be free (deployments/service/slot_audit.py
#: gives back a lost one after two audits, 30 s apart).
RETURNED_WITHIN = 10


@dataclass
class Service:
    proc: subprocess.Popen[bytes]
    log: Path
    home: Path
    api: str
    auth: str
    dcmtk: StoreSCP
    limited: CountingSCP
    slow: CountingSCP
    gate: threading.Event

    def sent(self, cases: list[Path]) -> bool:
        return all((self.home / "success" / c.name).is_dir() for c in cases)

    def active_slots(self) -> dict[str, int]:
        code, _, body = request(
            f"{self.api}/v2/concurrency_limits/filter", "POST", basic(self.auth), b"{}"
        )
        assert code == 200, body[:300]
        return {limit["name"]: limit["active_slots"] for limit in json.loads(body)}

    def child(self, *words: str) -> psutil.Process | None:
        """The running process of this service whose command line has ``words`` in a row
        (``server start`` is the API's, ``services start`` the services')."""
        for process in psutil.Process(self.proc.pid).children(recursive=True):
            try:
                argv = process.cmdline()
                if process.status() == psutil.STATUS_ZOMBIE:
                    continue
            except psutil.Error:
                continue
            if any(argv[i : i + len(words)] == list(words) for i in range(len(argv))):
                return process
        return None

    def redis(self) -> psutil.Process | None:
        for process in psutil.Process(self.proc.pid).children():
            with contextlib.suppress(psutil.Error):
                if process.name() == "redis-server" and process.status() != psutil.STATUS_ZOMBIE:
                    return process
        return None

    def api_workers(self) -> list[psutil.Process]:
        """uvicorn's worker processes: the children of ``prefect server start`` serving HTTP."""
        parent = self.child("server", "start")
        if parent is None:
            return []
        found = []
        for process in parent.children():
            with contextlib.suppress(psutil.Error):
                if "spawn_main" in " ".join(process.cmdline()) and process.is_running():
                    found.append(process)
        return found


TARGETS = """
from blocks.dicom import DicomTarget
from blocks.settings import DispatcherSettings
DispatcherSettings(retry_delay=0, retry_max=10, dispatcher_scan_interval=0.2).save(
    'default', overwrite=True)
for name, port, aet, limit in {targets!r}:
    DicomTarget(target_name=name, ip='127.0.0.1', port=str(port), aet_target=aet,
                max_concurrent_sends=limit, dimse_timeout=120).save(name, overwrite=True)
"""


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    folder = tmp_path_factory.mktemp("api-processes")
    home = folder / "home"
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_API")}
    env.update({"DICOM_DISPATCH_HOME": str(home), "PREFECT_HOME": str(home / "prefect")})
    gate = threading.Event()
    with ExitStack() as peers:
        dcmtk = peers.enter_context(StoreSCP(folder / "dcmtk"))
        limited = peers.enter_context(counting_scp("LIMITED"))
        slow = peers.enter_context(counting_scp("SLOW", gate=gate))
        proc, log = start_serve(
            folder,
            "--port",
            str(port),
            "--api-processes",
            "2",
            "--workers",
            "2",
            environ=env,
            DICOM_DISPATCH_HOME=str(home),
        )
        try:
            wait_for(lambda: b"dispatching from" in log.read_bytes(), 240, "serve to start")
            api = f"http://127.0.0.1:{port}/api"
            auth = (home / "api-auth-string").read_text().strip()
            targets = [
                ("dcmtk", dcmtk.port, dcmtk.aet, None),
                ("limited", limited.port, limited.aet, 1),
                ("slow", slow.port, slow.aet, 2),
            ]
            run_as_client(TARGETS.format(targets=targets), api, auth, home)
            found = Service(proc, log, home, api, auth, dcmtk, limited, slow, gate)
            # serve sets the targets' tag limits at its next settings refresh (15 s).
            wanted = {"tag:target:limited", "tag:target:slow"}
            wait_for(lambda: wanted <= set(found.active_slots()), 60, "the targets' limits")
            yield found
        finally:
            gate.set()
            if proc.poll() is None:
                stop(proc, log)


def test_cases_arrive_once_and_a_limit_of_one_holds(service: Service) -> None:
    """Two dispatchers, two API processes: every instance reaches storescp and the limited
    peer once, and the limited peer never has two associations open."""
    cases = [make_case(service.home / "outgoing", ["dcmtk", "limited"], files=2) for _ in range(6)]
    wait_for(lambda: service.sent(cases), 180, "every case in success/")
    assert len(service.dcmtk.received()) == 12
    assert len(service.limited.uids) == 12
    assert len(set(service.limited.uids)) == 12, "an instance arrived twice"
    assert service.limited.max_open == 1, f"{service.limited.max_open} associations at once"


def test_killed_api_and_services_processes_come_back(service: Service) -> None:
    """An API worker killed is replaced by uvicorn's parent; the parent and the services
    process killed are started again by serve's supervisor; cases go on."""
    (worker, _) = wait_for(lambda: service.api_workers(), 30, "two API processes")
    worker.kill()
    wait_for(
        lambda: len(service.api_workers()) == 2 and worker not in service.api_workers(),
        60,
        "a new API process",
    )
    parent, services = service.child("server", "start"), service.child("services", "start")
    assert parent is not None
    assert services is not None
    before = restarts(service.home) or 0
    parent.kill()
    services.kill()
    wait_for(lambda: restarts(service.home) == before + 2, 120, "the supervisor's restarts")
    again = [service.child("server", "start"), service.child("services", "start")]
    assert None not in again
    assert {p.pid for p in again if p}.isdisjoint({parent.pid, services.pid})
    assert len(service.api_workers()) == 2
    cases = [make_case(service.home / "outgoing", ["dcmtk"], files=1) for _ in range(3)]
    wait_for(lambda: service.sent(cases), 120, "cases sent after the restarts")


def test_redis_killed_while_sends_hold_slots_loses_no_slot(service: Service) -> None:
    """Sends held at the peer hold their tag-limit slots (leases in Redis); Redis SIGKILLed
    and restarted by serve: the leases are back, the sends finish, every slot is returned."""
    cases = [make_case(service.home / "outgoing", ["slow"], files=1) for _ in range(2)]
    wait_for(lambda: service.slow.open_now >= 1, 60, "a send held at the peer")
    wait_for(
        lambda: service.active_slots().get("tag:target:slow", 0) >= 1,
        30,
        "a slot held",
        show=service.active_slots,
    )
    time.sleep(1.5)  # Redis writes its append-only file every second
    redis = service.redis()
    assert redis is not None
    before = restarts(service.home) or 0
    redis.kill()
    wait_for(lambda: restarts(service.home) == before + 1, 120, "Redis and the server back")
    back = service.redis()
    assert back is not None
    assert back.pid != redis.pid
    service.gate.set()
    wait_for(lambda: service.sent(cases), 120, "the held cases in success/")
    # Given back by the sends themselves: within seconds, before serve's slot audit (two
    # audits 30 s apart) could give back a slot whose lease Redis had lost.
    wait_for(
        lambda: not any(service.active_slots().values()),
        RETURNED_WITHIN,
        "every slot returned by its send",
        show=service.active_slots,
    )
    assert sorted(set(service.slow.uids)) == sorted(service.slow.uids)
    assert len(service.slow.uids) == 2


def test_sigterm_stops_every_process_within_15_s(service: Service) -> None:
    tree = every_process(service.proc, service.home)
    lines = {p.pid: describe(p) for p in tree}
    assert any("redis-server" in line for line in lines.values()), lines
    assert any("services start" in line for line in lines.values()), lines
    password = (service.home / "redis" / "password").read_text().strip()
    assert not [line for line in lines.values() if password in line], "password on a command line"
    service.proc.send_signal(signal.SIGTERM)
    started = time.monotonic()
    late = running_after(tree, started + STOP_PROMISE)
    took = time.monotonic() - started
    running_after(late, started + 60)
    assert not late, f"still running after {STOP_PROMISE} s: {[lines[p.pid] for p in late]}"
    assert service.proc.wait(5) == 0, service.log.read_text()[-3000:]
    print(f"stopped in {took:.1f} s")
    logs = [service.log, *(service.home / "logs").iterdir()]
    assert not [p for p in logs if password in p.read_text(errors="replace")], "password logged"
