"""OpenREM's background-job API against a real Prefect server and a running executor.

(One file of over 500 lines: its tests share one executor process, started once.)

The executor is ``python -m deployments.background_service`` (what ``dicom-dispatch serve``
runs), as a subprocess; jobs are functions of ``tests.jobs_fixtures`` that write their start and
end times into files, so concurrency is measured from what really ran. Every test uses its own
task types: the counters of active jobs live on the (shared) server.

Slow tests (own Prefect server, lease expiry): ``test_slow_server_restart_and_killed_executor``
(about 2 minutes).
"""

from __future__ import annotations

import datetime as dt
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest

from tests import jobs_fixtures
from tests.service import REPO, run_cli, wait_for

pytestmark = pytest.mark.timeout(240)

FIXTURES = "tests.jobs_fixtures"
INSTALLER = "deployments.service_unit:main"


def read(out: Path, name: str) -> dict[str, Any]:
    return dict(json.loads((out / f"{name}.json").read_text()))


def started(out: Path, name: str) -> bool:
    return (out / f"{name}.start.json").exists()


def max_overlap(intervals: list[tuple[float, float]]) -> int:
    events = sorted([(s, 1) for s, _ in intervals] + [(e, -1) for _, e in intervals])
    best = current = 0
    for _, step in events:  # an end at the same instant as a start sorts first
        current += step
        best = max(best, current)
    return best


def kinds() -> str:
    return uuid.uuid4().hex[:8]


class Executor:
    """``python -m deployments.background_service`` as a subprocess."""

    def __init__(self, api_url: str, home: Path, log: Path) -> None:
        self.log = log
        env = {
            **os.environ,
            "PREFECT_API_URL": api_url,
            "DICOM_DISPATCH_HOME": str(home),
            "DICOM_DISPATCH_JOBS_POLL_SECONDS": "0.3",
            "DICOM_DISPATCH_LOG_LEVEL": "DEBUG",
            # listed by mistake (or by an attacker who can edit the host's environment file):
            # an installer is never run as a job all the same
            "DICOM_DISPATCH_JOBS": f"{os.environ['DICOM_DISPATCH_JOBS']},{INSTALLER}",
        }
        with open(log, "ab") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "deployments.background_service"],
                cwd=REPO,
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        wait_for(lambda: "background executor on" in self.text(), 60, "the executor to start")

    def text(self) -> str:
        if self.proc.poll() is not None:
            raise AssertionError(f"the executor exited: {self.log.read_text()[-3000:]}")
        return self.log.read_text(errors="replace")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                raise AssertionError("the executor did not stop within 30 s") from None


@pytest.fixture(scope="module")
def executor(prefect_server: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Executor]:
    base = tmp_path_factory.mktemp("executor")
    ex = Executor(prefect_server, base / "home", base / "executor.log")
    try:
        yield ex
    finally:
        ex.stop()


@pytest.fixture
def out(tmp_path: Path) -> Path:
    path = tmp_path / "out"
    path.mkdir()
    return path


def counters(*task_types: str) -> dict[str, int]:
    from prefect.client.orchestration import get_client

    from flows.background import type_counter

    found: dict[str, int] = {}
    with get_client(sync_client=True) as client:
        for t in task_types:
            limit = client.read_global_concurrency_limit_by_name(type_counter(t))
            found[t] = limit.active_slots
    return found


# --------------------------------------------------------------------------- limits


def test_burst_limits_hold_and_other_types_pass(executor: Executor, out: Path) -> None:
    """40 jobs, total 3 and A = 1: never more; a B queued behind 20 A's starts before most."""
    from flows.background import run_in_background_with_limits, wait_task

    k = kinds()
    a, b, c = f"A-{k}", f"B-{k}", f"C-{k}"
    submitted: list[tuple[str, Any]] = []

    def submit(task_type: str, name: str, limits: dict[str, int]) -> None:
        task = run_in_background_with_limits(
            jobs_fixtures.timed, task_type, 3, limits, str(out), name, task_type, 0.3
        )
        submitted.append((name, task))

    for i in range(20):
        submit(a, f"a{i}", {a: 1})
    submit(b, "b-first", {})
    for i in range(19):
        submit(b if i % 2 else c, f"x{i}", {} if i % 3 else {a: 1, b: 2})
    for name, task in submitted:
        record = wait_task(task, timeout=180)
        assert record.completed_successfully, (name, record.error)

    jobs = {name: read(out, name) for name, _ in submitted}
    spans = {name: (j["start"], j["end"]) for name, j in jobs.items()}
    total = max_overlap(list(spans.values()))
    only_a = max_overlap([spans[n] for n, j in jobs.items() if j["type"] == a])
    assert total <= 3, f"total concurrency {total} > 3"
    assert only_a <= 1, f"type A concurrency {only_a} > 1"
    assert total >= 2, "jobs of other types should have run next to the A's"
    for name in (f"x{i}" for i in range(0, 19, 3)):  # these wait for A (a cross-type key)
        assert all(
            spans[name][0] >= spans[n][1] or spans[name][1] <= spans[n][0]
            for n, j in jobs.items()
            if j["type"] == a
        ), f"{name} ran next to an A job"
    later_a = [n for n in jobs if n.startswith("a") and spans[n][0] > spans["b-first"][0]]
    assert len(later_a) >= 15, f"b-first started before only {len(later_a)} of the 20 A jobs"
    wait_for(lambda: counters(a, b, c) == {a: 0, b: 0, c: 0}, 10, "all slots to be free")


def test_two_executors_share_the_limits(
    executor: Executor, out: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """Limits hold across processes: two executors, one type limited to 2, one total of 3."""
    from flows.background import run_in_background_with_limits, wait_task

    base = tmp_path_factory.mktemp("second-executor")
    second = Executor(os.environ["PREFECT_API_URL"], base / "home", base / "executor.log")
    try:
        # Which executor wins each admission is timing; repeat the burst (limits checked every
        # time) until both have run jobs, so the cross-process case is really exercised.
        for _ in range(4):
            d, e = f"D-{kinds()}", f"E-{kinds()}"
            jobs = [
                run_in_background_with_limits(
                    jobs_fixtures.timed, t, 3, {d: 2}, str(out), f"{t}{i}", t, 0.4
                )
                for i in range(8)
                for t in (d, e)
            ]
            for job in jobs:
                assert wait_task(job, timeout=120).completed_successfully
            spans = [read(out, f"{t}{i}") for i in range(8) for t in (d, e)]
            assert max_overlap([(j["start"], j["end"]) for j in spans]) <= 3
            assert max_overlap([(j["start"], j["end"]) for j in spans if j["type"] == d]) <= 2
            if "admitted" in second.text():
                break
        assert "admitted" in second.text(), "the second executor should have run jobs too"
    finally:
        second.stop()


def test_queue_positions_priority_cross_type_and_remove(executor: Executor, out: Path) -> None:
    from flows.background import (
        REMOVED_FROM_QUEUE,
        JobNotFoundError,
        JobNotQueuedError,
        get_queued_tasks,
        get_task,
        remove_task_from_queue,
        run_in_background_with_limits,
        wait_task,
    )

    k = kinds()
    q, qx = f"Q-{k}", f"Q-{k}x"
    flag = out / "go"

    def job(name: str, task_type: str, limits: dict[str, int], **kw: Any) -> Any:
        return run_in_background_with_limits(
            f"{FIXTURES}:wait_for_file", task_type, 0, limits, str(out), name, str(flag), **kw
        )

    blocker = job("blocker", q, {q: 1})
    wait_for(lambda: started(out, "blocker"), 30, "the blocker to start")
    q1 = job("q1", q, {q: 1})
    q2 = job("q2", q, {q: 1})
    x1 = job("x1", qx, {q: 1})  # another type that waits for Q (OpenREM's NM waits for RDSR)
    q3 = job("q3", q, {q: 1}, priority=10)

    queued = get_queued_tasks(q)
    assert [(t.task_id, t.queue_position) for t in queued] == [
        (q3.id, 1),
        (q1.id, 2),
        (q2.id, 3),
    ]
    assert {t.task_type for t in queued} == {q}  # exact match: Q-...x is not listed
    assert [(t.task_id, t.queue_position) for t in get_queued_tasks(qx)] == [(x1.id, 1)]
    everything = [t.task_id for t in get_queued_tasks()]
    assert everything.index(q3.id) < everything.index(q1.id) < everything.index(q2.id)

    removed = remove_task_from_queue(q1.id)
    assert removed.complete
    assert not removed.completed_successfully
    assert removed.error == REMOVED_FROM_QUEUE
    assert [(t.task_id, t.queue_position) for t in get_queued_tasks(q)] == [(q3.id, 1), (q2.id, 2)]
    with pytest.raises(JobNotQueuedError, match="not queued"):
        remove_task_from_queue(blocker)
    with pytest.raises(JobNotFoundError):
        remove_task_from_queue(str(uuid.uuid4()))

    flag.touch()
    for task in (blocker, q2, q3, x1):
        assert wait_task(task, timeout=60).completed_successfully
    assert not started(out, "q1"), "a removed job must never start"
    assert get_task(q1).state == "Cancelled"
    spans = {n: (read(out, n)["start"], read(out, n)["end"]) for n in ("q2", "q3", "x1")}
    assert spans["q3"][0] < spans["q2"][0], "priority 10 starts first"
    assert spans["x1"][0] >= spans["q2"][1], "x1 waits until no Q job is active"


# --------------------------------------------------------------------------- terminate, kill


def victim_and_follower(out: Path, t: str) -> tuple[Any, Any, int]:
    """A job of type ``t`` (limit 1) that runs until stopped, one queued behind it for its
    slot, and the pid of the first once it started."""
    from flows.background import run_in_background_with_limits

    victim = run_in_background_with_limits(
        f"{FIXTURES}:wait_for_file", t, 0, {t: 1}, str(out), "victim", str(out / "never")
    )
    after = run_in_background_with_limits(
        f"{FIXTURES}:timed", t, 0, {t: 1}, str(out), "after", t, 0.1
    )
    wait_for(lambda: started(out, "victim"), 30, "the victim to start")
    return victim, after, int(read(out, "victim.start")["pid"])


def test_terminate_kills_the_process_and_frees_the_slot(executor: Executor, out: Path) -> None:
    from flows.background import FORCEFULLY_ABORTED, terminate_background, wait_task

    t = f"T-{kinds()}"
    victim, after, pid = victim_and_follower(out, t)

    t0 = time.monotonic()
    record = terminate_background(victim)
    took = time.monotonic() - t0
    assert took < 10, f"terminate took {took:.1f} s"
    assert record.complete
    assert not record.completed_successfully
    assert record.state == "Cancelled"
    assert record.error == FORCEFULLY_ABORTED
    assert not psutil.pid_exists(pid), "the job's process must be gone"
    assert wait_task(after, timeout=30).completed_successfully, "the slot is reused"
    assert not (out / "victim.json").exists()
    wait_for(lambda: counters(t) == {t: 0}, 10, "the slots to be free")


def test_sigkilled_job_gives_its_slot_back(executor: Executor, out: Path) -> None:
    """SIGKILL of a job's process: the run ends Crashed and its slot is reused within seconds
    (well inside the lease time, which only matters if the executor dies too)."""
    from flows.background import get_task, wait_task

    t = f"K-{kinds()}"
    victim, after, pid = victim_and_follower(out, t)
    os.kill(pid, signal.SIGKILL)
    killed_at = time.time()
    assert wait_task(after, timeout=60).completed_successfully
    delay = read(out, "after")["start"] - killed_at
    assert delay < 15, f"the slot came back after {delay:.1f} s"
    record = get_task(victim)
    assert record.state == "Crashed"
    assert "-9" in (record.error or "")
    wait_for(lambda: counters(t) == {t: 0}, 10, "the slots to be free")


# --------------------------------------------------------------------------- records


def test_info_error_current_task_and_exit_codes(executor: Executor, out: Path) -> None:
    from flows.background import (
        get_current_task,
        get_or_generate_task_uuid,
        run_in_background,
        wait_task,
    )

    t = f"I-{kinds()}"
    ident = run_in_background(jobs_fixtures.report_identity, t, str(out), "ident")
    err = run_in_background(jobs_fixtures.error_exit, t, str(out), "err", "no study found")
    boom = run_in_background(jobs_fixtures.boom, t, "boom message")
    exit3 = run_in_background(jobs_fixtures.exit_with, t, 3)
    exit0 = run_in_background(jobs_fixtures.exit_with, t, 0)
    assert ident.state == "AwaitingConcurrencySlot"
    assert ident.id == ident.uuid

    record = wait_task(ident, timeout=60)
    assert record.completed_successfully
    assert record.complete
    assert record.error is None
    assert record.info == "**done** reading"
    assert record.task_type == t
    assert record.func == f"{FIXTURES}:report_identity"
    assert record.started_at
    assert record.ended_at
    assert record.created_at
    assert record.created_at <= record.started_at <= record.ended_at
    seen = read(out, "ident")
    assert seen["current"] == seen["generated"] == record.uuid
    assert seen["current_type"] == t
    assert record.proc_id == f"{os.uname().nodename}:{seen['pid']}"

    record = wait_task(err, timeout=60)
    assert record.complete
    assert not record.completed_successfully
    assert record.state == "Failed"
    assert record.error == "no study found"
    assert read(out, "err") == {"current_after_error": False}

    record = wait_task(boom, timeout=60)
    assert record.state == "Failed"
    assert record.error
    assert record.error.startswith("Traceback")
    assert "ValueError: boom message" in record.error
    assert "jobs_fixtures.py" in record.error
    assert "asyncio" not in record.error

    assert "sys.exit(3)" in (wait_task(exit3, timeout=60).error or "")
    assert wait_task(exit0, timeout=60).completed_successfully

    assert get_current_task() is None
    first, second = get_or_generate_task_uuid(), get_or_generate_task_uuid()
    assert first != second
    assert uuid.UUID(first)


def test_retry_from_the_ui_runs_the_job_again(executor: Executor) -> None:
    """The UI's "Retry" puts a failed run back to Scheduled (AwaitingRetry): it runs again."""
    from prefect.client.orchestration import get_client
    from prefect.states import AwaitingRetry

    from flows.background import run_in_background, wait_task

    job = run_in_background(jobs_fixtures.exit_with, f"Y-{kinds()}", 3)
    assert wait_task(job, timeout=60).state == "Failed"
    with get_client(sync_client=True) as client:  # at once: its process may still be exiting
        client.set_flow_run_state(job.uuid, AwaitingRetry(), force=True)
        wait_for(lambda: client.read_flow_run(job.uuid).run_count == 2, 60, "the second run")
    record = wait_task(job, timeout=60)
    assert record.state == "Failed"
    assert record.error == "the job called sys.exit(3)"


def _plant_run(func: str, args: list[Any], task_type: str) -> Any:
    """A run created on the API directly (not through our API's checks), as an attacker would."""
    from prefect.client.orchestration import get_client
    from prefect.states import Scheduled

    from flows.background import get_task
    from flows.background.queue import ensure_deployment

    with get_client(sync_client=True) as client:
        deployment_id = ensure_deployment(client)
        assert deployment_id is not None
        run = client.create_flow_run_from_deployment(
            deployment_id,
            parameters={"func": func, "args": args, "task_type": task_type},
            state=Scheduled(),
            tags=["background-job", f"task-type:{task_type}"],
        )
    return get_task(run.id)


def test_executor_runs_only_registered_functions(executor: Executor, tmp_path: Path) -> None:
    """Runs created on the API naming ``os:system``, or an unregistered function of a module
    whose other functions are registered, end Failed with the reason, and nothing ran; a
    registered one next to them still runs."""
    from flows.background import wait_task

    planted, unregistered = tmp_path / "planted", tmp_path / "unregistered"
    t = f"S-{kinds()}"
    system = _plant_run("os:system", [f"touch {planted}"], t)
    other = _plant_run(f"{FIXTURES}:unregistered", [str(unregistered)], t)
    fine = _plant_run(f"{FIXTURES}:quick", [], t)
    for job in (system, other):
        record = wait_task(job, timeout=60)
        assert record.state == "Failed"
        assert "is not registered as a background job" in (record.error or "")
    assert wait_task(fine, timeout=60).completed_successfully
    assert not planted.exists(), "the refused job's function ran"
    assert not unregistered.exists(), "the unregistered job's function ran"
    assert "refused" in executor.text()


def test_an_installer_never_runs_as_a_job(executor: Executor, tmp_path: Path) -> None:
    """``deployments.service_unit:main`` writes a unit file wherever it is told: listed in the
    executor's ``DICOM_DISPATCH_JOBS`` or not, it never runs as a job; nothing is written."""
    import getpass

    from flows.background import JobRefusedError, run_in_background, wait_task

    unit = tmp_path / "evil.service"
    argv = ["--user", getpass.getuser(), "--data-dir", str(tmp_path), "--output", str(unit)]
    job = _plant_run(INSTALLER, [argv], f"I-{kinds()}")
    record = wait_task(job, timeout=60)
    assert record.state == "Failed"
    assert "never a job" in (record.error or "")
    assert not unit.exists(), "the installer ran as a job"
    with pytest.raises(JobRefusedError, match="never a job"):
        run_in_background(INSTALLER, f"I-{kinds()}", argv)


def test_import_config_ignores_job_modules(prefect_server: str, tmp_path: Path) -> None:
    """``jobs_modules`` in the imported JSON (of earlier releases) is ignored with a warning
    naming it; the settings keep none."""
    import asyncio

    from blocks.registry import aload_settings
    from deployments.importer import import_mercure_config

    config = tmp_path / "mercure.json"
    for value in (["remapp"], "remapp"):
        config.write_text(json.dumps({"targets": {}, "jobs_modules": value}))
        report = asyncio.run(import_mercure_config(config))
        assert "DICOM_DISPATCH_JOBS" in report.warnings["jobs_modules"][0]
        assert "remapp" not in asyncio.run(aload_settings()).jobs_modules


def _nested() -> Callable[[], None]:
    def inner() -> None:
        return None

    return inner


@pytest.mark.parametrize(
    ("func", "args", "kwargs", "match"),
    [
        (lambda: None, (), {}, "not a top-level function"),
        (_nested(), (), {}, "not a top-level function"),
        (f"{FIXTURES}:no_such_function", (), {}, "has no function"),
        ("no_such_module_here:run", (), {}, "cannot be imported"),
        ("not a reference", (), {}, "module:function"),
        (jobs_fixtures.quick, (object(),), {}, "JSON"),
        (jobs_fixtures.quick, (), {"when": dt.datetime.now()}, "JSON"),
        (jobs_fixtures.quick, ([1, (2, 3)],), {}, "round trip"),
        ("os:system", ("true",), {}, "not registered as a background job"),
        ("subprocess:run", (["true"],), {}, "not registered as a background job"),
        (f"{FIXTURES}:unregistered", ("x",), {}, "not registered as a background job"),
        (INSTALLER, (["--help"],), {}, "never a job"),
    ],
)
def test_refused_before_anything_is_queued(
    prefect_server: str, func: Any, args: tuple[Any, ...], kwargs: dict[str, Any], match: str
) -> None:
    from flows.background import JobRefusedError, list_tasks, run_in_background

    t = f"R-{kinds()}"
    with pytest.raises(JobRefusedError, match=match):
        run_in_background(func, t, *args, **kwargs)
    listing = list_tasks(t)
    assert not listing.queued
    assert not listing.active
    assert not listing.recent


def test_bad_types_and_limits_are_refused(prefect_server: str) -> None:
    from flows.background import JobRefusedError, run_in_background_with_limits

    quick = jobs_fixtures.quick
    with pytest.raises(JobRefusedError, match="task_type"):
        run_in_background_with_limits(quick, "bad/type", 0, {})
    with pytest.raises(JobRefusedError, match="num_proc"):
        run_in_background_with_limits(quick, "ok", -1, {})
    with pytest.raises(JobRefusedError, match="num_of_task_type"):
        run_in_background_with_limits(quick, "ok", 0, {"ok": -2})


# --------------------------------------------------------------------------- CLI


def test_jobs_cli(executor: Executor, out: Path) -> None:
    t = f"L-{kinds()}"

    def cli(*argv: str) -> subprocess.CompletedProcess[str]:
        return run_cli("jobs", *argv, cwd=REPO)

    ok = cli("run", f"{FIXTURES}:timed", "--type", t, "--limit", f"{t}=1", str(out), "c1", t, "0.1")
    assert ok.returncode == 0, ok.stderr
    job_id = ok.stdout.strip()
    waited = cli("wait", job_id, "--json")
    assert waited.returncode == 0, waited.stderr
    assert json.loads(waited.stdout)["completed_successfully"] is True

    failed = cli("run", f"{FIXTURES}:boom", "--type", t, '"cli boom"', "--wait")
    assert failed.returncode == 1
    assert "ValueError: cli boom" in failed.stdout

    refused = cli("run", f"{FIXTURES}:nope", "--type", t)
    assert refused.returncode == 2
    assert "has no function" in refused.stderr

    listed = cli("list", "--type", t, "--json")
    assert listed.returncode == 0, listed.stderr
    recent = json.loads(listed.stdout)["recent"]
    assert {r["uuid"] for r in recent} >= {job_id}
    assert {r["task_type"] for r in recent} == {t}

    gone = cli("remove", job_id)
    assert gone.returncode == 1
    assert "not queued" in gone.stderr


# --------------------------------------------------------------------------- slow


def test_slow_server_restart_and_killed_executor(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """SLOW (about 2 minutes; own Prefect server).

    1. Prefect server restarted while two jobs hold slots: afterwards the counters are right
       (2 while they run, 0 when they ended): no slot leaked, none lost.
    2. The executor is SIGKILLed while its job runs: the job's process dies with it, the slot
       comes back by itself when the lease expires, and the next executor marks the run Crashed.
    """
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from flows.background import get_task, run_in_background_with_limits, wait_task
    from tests.peers.prefect_server import running_prefect_server

    monkeypatch.setenv("PREFECT_SERVER_SERVICES_REPOSSESSOR_LOOP_SECONDS", "2")
    out = tmp_path / "out"
    out.mkdir()
    r, s = f"R-{kinds()}", f"S-{kinds()}"
    with running_prefect_server(tmp_path / "server") as server:
        with temporary_settings(updates={PREFECT_API_URL: server.api_url}):
            first = Executor(server.api_url, tmp_path / "home", tmp_path / "executor1.log")
            try:
                flag = out / "go"
                jobs = [
                    run_in_background_with_limits(
                        f"{FIXTURES}:wait_for_file", r, 0, {r: 2}, str(out), n, str(flag)
                    )
                    for n in ("r1", "r2")
                ]
                wait_for(lambda: started(out, "r1") and started(out, "r2"), 30, "r1 and r2")
                assert counters(r) == {r: 2}

                server.stop()
                time.sleep(2)
                server.start()
                assert counters(r) == {r: 2}, "slots lost or doubled by the restart"
                time.sleep(20)  # past a lease renewal after the restart
                assert counters(r) == {r: 2}
                flag.touch()
                for job in jobs:
                    assert wait_task(job, timeout=60).completed_successfully
                wait_for(lambda: counters(r) == {r: 0}, 10, "the slots to be released")

                victim = run_in_background_with_limits(
                    f"{FIXTURES}:wait_for_file", s, 0, {s: 1}, str(out), "s1", str(out / "never")
                )
                wait_for(lambda: started(out, "s1"), 30, "s1 to start")
                pid = read(out, "s1.start")["pid"]
                first.proc.send_signal(signal.SIGKILL)
                first.proc.wait(10)
                killed_at = time.monotonic()
            finally:
                first.stop()
            try:
                wait_for(lambda: not psutil.pid_exists(pid), 10, "the job to die with its executor")
            finally:
                if psutil.pid_exists(pid):
                    os.kill(pid, signal.SIGKILL)
            assert counters(s) == {s: 1}, "the lease holds the slot until it expires"
            wait_for(lambda: counters(s) == {s: 0}, 90, "the lease to expire", every=1)
            back_after = time.monotonic() - killed_at
            assert back_after <= 60 + 15, f"the slot came back after {back_after:.0f} s"

            second = Executor(server.api_url, tmp_path / "home", tmp_path / "executor2.log")
            try:
                wait_for(
                    lambda: get_task(victim).state == "Crashed", 60, "the stale run to be Crashed"
                )
                after = run_in_background_with_limits(
                    f"{FIXTURES}:timed", s, 0, {s: 1}, str(out), "s2", s, 0.1
                )
                assert wait_task(after, timeout=60).completed_successfully
            finally:
                second.stop()
