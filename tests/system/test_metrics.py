"""``serve``'s Prometheus endpoint reports a known run of cases exactly, scraped while it runs."""

from __future__ import annotations

import json
import urllib.request
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from blocks.folder import FolderTarget
from tests.cases import make_case
from tests.dispatch_env import DispatchEnv
from tests.service import free_port, start_serve, stop, wait_for


def scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:  # noqa: S310
        text = resp.read().decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def test_metrics_count_a_known_run_of_cases(env: DispatchEnv, tmp_path: Path) -> None:
    env.save_target(FolderTarget(folder=str(tmp_path / "share")), "share")
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("a file where the target folder should be")
    env.save_target(FolderTarget(folder=str(blocker / "sub")), "broken")
    env.save_settings(retry_max=2)
    port = free_port()
    (env.outgoing / "HALT").touch()  # all cases in place before the loop looks
    sent = [make_case(env.outgoing, ["share"], files=2) for _ in range(3)]
    failing = make_case(env.outgoing, ["broken"], files=1)
    proc, log = start_serve(tmp_path, DICOM_DISPATCH_METRICS_PORT=str(port))
    try:

        def endpoint_up() -> bool:
            try:
                return bool(scrape(port))
            except OSError:
                return False

        wait_for(endpoint_up, 90, "the metrics endpoint")
        before = scrape(port)
        assert before[("dicom_dispatch_queue_depth", (("folder", "outgoing"),))] == 4
        (env.outgoing / "HALT").unlink()
        wait_for(
            lambda: (
                all((env.success / c.name).is_dir() for c in sent)
                and (env.error / failing.name).is_dir()
            ),
            120,
            "the cases to finish",
        )
        attempts = json.loads((env.error / failing.name / "task.json").read_text())
        retries = int(attempts["dispatch"]["retries"] or 0)  # attempts sent back to the queue

        def counted() -> float:
            return sum(
                v for (name, _), v in scrape(port).items() if name.endswith("attempts_total")
            )

        def slots_in_use() -> float:
            return scrape(port).get(
                ("dicom_dispatch_limit_in_use", (("tag", "dicom-dispatch"),)), -1.0
            )

        # The last attempt is counted just after its folder moved; the limits are sampled
        # from Prefect periodically, so a sample taken during the last send may still show it.
        wait_for(lambda: counted() >= 3 + retries + 1, 10, "the last attempt to be counted")
        wait_for(lambda: slots_in_use() == 0, 30, "a sample of the limits after the last send")
        m = scrape(port)
    finally:
        stop(proc, log)
    # The case's files; the Folder target's own ``.complete`` marker is not one of them.
    arrived = [f for f in (tmp_path / "share").rglob("*") if f.is_file() and f.name != ".complete"]

    def value(name: str, **labels: str) -> float:
        return m.get((name, tuple(sorted(labels.items()))), 0.0)

    assert value("dicom_dispatch_target_cases_total", target="share", outcome="dispatched") == 3
    assert value("dicom_dispatch_sent_files_total", target="share") == len(arrived) >= 6
    assert value("dicom_dispatch_sent_bytes_total", target="share") == sum(
        f.stat().st_size for f in arrived
    )
    assert value("dicom_dispatch_target_cases_total", target="broken", outcome="failed") == 1
    assert (
        value("dicom_dispatch_target_cases_total", target="broken", outcome="retried")
        == retries
        >= 1
    )
    assert value("dicom_dispatch_case_attempts_total", location="success") == 3
    assert value("dicom_dispatch_case_attempts_total", location="error") == 1
    assert value("dicom_dispatch_case_attempts_total", location="outgoing") == retries
    assert value("dicom_dispatch_ready_to_success_seconds_count") == 3
    assert value("dicom_dispatch_queue_depth", folder="outgoing") == 0
    assert value("dicom_dispatch_queue_depth", folder="success") == 3
    assert value("dicom_dispatch_queue_depth", folder="error") == 1
    assert value("dicom_dispatch_processes") == 1
    assert value("dicom_dispatch_heartbeat_timestamp_seconds") > 0
    assert value("dicom_dispatch_limit", tag="dicom-dispatch") == 8
    assert value("dicom_dispatch_limit_in_use", tag="dicom-dispatch") == 0
    assert m[("dicom_dispatch_background_jobs", (("state", "RUNNING"),))] == 0
