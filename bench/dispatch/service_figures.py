"""Figures (a)–(e) of the service benchmark (``bench/service_bench.py``), each a ratio against
DCMTK or an empty Prefect flow run measured in the same run."""

from __future__ import annotations

import asyncio
import shutil
import time
from pathlib import Path
from typing import Any

from bench._common import fmt_runs, median, say
from bench.dispatch.dcmsend import dcmsend_loop
from bench.dispatch.report import Report, mark
from bench.dispatch.service import (
    DUMMY,
    PACS,
    CaseFolders,
    ProcessSampler,
    Service,
    drop,
    wait_done,
)

TARGET_A = 1.2
TARGET_B_EMPTY = 0.8
TARGET_B_LOOP = 6.0
TARGET_C = 1.25
TARGET_D_MS = 100.0
TARGET_E = 1.2
TARGET_RSS_MB = 500.0


def staged_cases(service: Service, count: int, target: str, **kwargs: Any) -> list[Path]:
    from bench.dispatch.data import make_cases

    return make_cases(service.staging, count, [target], **kwargs)


def mercure_copies(cases: list[Path], base: Path) -> list[Path]:
    base.mkdir(parents=True, exist_ok=True)
    return [Path(shutil.copytree(c, base / c.name)) for c in cases]


def drop_at_once(service: CaseFolders, cases: list[Path], timeout: float) -> float:
    """Move every case into outgoing/ at once; seconds until the last reached success/."""
    started = time.perf_counter()
    for case in cases:
        drop(case, service.outgoing)
    finished = wait_done(service, [c.name for c in cases], timeout)
    failed = [c.name for c in cases if (service.error / c.name).is_dir()]
    if failed:
        raise RuntimeError(f"{len(failed)} case(s) ended in error/")
    return finished - started


def figure_a(service: Service, out: Report, binary: str, port: int, cases: int, files: int) -> None:
    staged = staged_cases(service, cases, PACS, files=files, rows=512, cols=512)
    copies = mercure_copies(staged, service.staging.parent / "a-mercure")
    size = sum(p.stat().st_size for c in staged for p in c.glob("*.dcm")) / 1e6
    loop_s = dcmsend_loop(binary, copies, port)
    ours_s = drop_at_once(service, staged, 600)
    ratio = ours_s / loop_s
    say(f"(a) {cases} cases x {files} CT 512x512 ({size:.0f} MB) dropped at once -> storescp")
    say(f"    sequential dcmsend per case (mercure)   {loop_s:6.2f} s")
    say(
        f"    serve (backend auto)                    {ours_s:6.2f} s"
        f"  {ratio:5.2f} x{mark(ratio, TARGET_A)}"
    )
    out.put("a.dcmsend_loop.s", round(loop_s, 3))
    out.put("a.serve.s", round(ours_s, 3))
    out.put("a.ratio", round(ratio, 3))


def service_api(service: Service) -> Any:
    """This process's client settings for the service's API: its URL and its auth string."""
    from prefect.settings import PREFECT_API_AUTH_STRING, PREFECT_API_URL, temporary_settings

    auth = (service.home / "api-auth-string").read_text().strip()
    return temporary_settings(
        updates={PREFECT_API_URL: service.api_url, PREFECT_API_AUTH_STRING: auth}
    )


async def _empty_rate(service: Service, runs: int, concurrency: int) -> tuple[float, list[float]]:
    """Empty async flow runs from this process: (runs/s at ``concurrency``, sequential walls)."""
    from prefect import flow

    @flow(name="bench_empty", persist_result=False)
    async def bench_empty() -> None:
        return None

    with service_api(service):
        await bench_empty()  # warm-up
        slots = asyncio.Semaphore(concurrency)

        async def one() -> None:
            async with slots:
                await bench_empty()

        started = time.perf_counter()
        await asyncio.gather(*(one() for _ in range(runs)))
        rate = runs / (time.perf_counter() - started)
        walls = []
        for _ in range(max(5, runs // 4)):
            began = time.perf_counter()
            await bench_empty()
            walls.append(time.perf_counter() - began)
    return rate, walls


def empty_rate(service: Service, runs: int, concurrency: int) -> tuple[float, list[float]]:
    return asyncio.run(_empty_rate(service, runs, concurrency))


def figure_b(service: Service, out: Report, binary: str, port: int, cases: int) -> None:
    staged = staged_cases(service, cases, PACS, files=5, rows=64, cols=64)
    copies = mercure_copies(staged, service.staging.parent / "b-mercure")
    loop_s = dcmsend_loop(binary, copies, port)
    with ProcessSampler(service) as sampler:
        ours_s = drop_at_once(service, staged, 1200)
    ours, theirs = cases / ours_s, cases / loop_s
    empty, _ = empty_rate(service, cases, concurrency=8)
    say(f"(b) {cases} cases x 5 CT 64x64 dropped at once -> storescp; num_proc 8 (default)")
    say(f"    sequential dcmsend per case (mercure)   {theirs:6.1f} cases/s ({loop_s:.1f} s)")
    say(f"    serve                                   {ours:6.1f} cases/s ({ours_s:.1f} s)")
    say(f"    empty async flow runs, 8 at once        {empty:6.1f} runs/s (this process)")
    loop_ratio, empty_ratio = theirs / ours, ours / empty
    say(
        f"    loop ÷ serve (time ratio)               {loop_ratio:6.2f}"
        f"{mark(loop_ratio, TARGET_B_LOOP)}"
    )
    say(
        f"    serve ÷ empty-flow rate                 {empty_ratio:6.2f}"
        f"{mark(empty_ratio, TARGET_B_EMPTY, higher_is_better=True)}"
    )
    rss = sampler.peak_mb
    say(
        f"    peak RSS: dispatcher {rss.get('dispatcher', 0):.0f} MB"
        f"{mark(rss.get('dispatcher', 0), TARGET_RSS_MB)}; Prefect server "
        f"{rss.get('Prefect server', 0):.0f} MB; PostgreSQL {rss.get('PostgreSQL', 0):.0f} MB"
    )
    cpu = ", ".join(f"{k} {v / cases * 1e3:.0f}" for k, v in sampler.cpu_s.items())
    say(f"    CPU ms per case: {cpu}")
    out.put("b.serve.s", round(ours_s, 3))
    out.put("b.cases_per_s", round(ours, 2))
    out.put("b.dcmsend_loop.cases_per_s", round(theirs, 2))
    out.put("b.empty_flows_per_s", round(empty, 2))
    out.put("b.ratio_vs_loop", round(ours_s / loop_s, 3))
    out.put("b.ratio_vs_empty", round(empty_ratio, 3))
    out.put("b.peak_rss_mb", {k: round(v, 1) for k, v in rss.items()})
    out.put("b.cpu_ms_per_case", {k: round(v / cases * 1e3, 1) for k, v in sampler.cpu_s.items()})


async def _run_end(service: Service, case: str) -> float:
    """When the case's flow run reached its final state (server time, epoch seconds)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterTags
    from prefect.client.schemas.sorting import FlowRunSort

    wanted = FlowRunFilter(tags=FlowRunFilterTags(all_=[f"case:{case}"]))
    with service_api(service):
        async with get_client() as client:
            for _ in range(600):
                runs = await client.read_flow_runs(
                    flow_run_filter=wanted, sort=FlowRunSort.ID_DESC, limit=5
                )
                ended = [r.end_time for r in runs if r.state and r.state.is_final() and r.end_time]
                if ended:
                    return max(ended).timestamp()
                await asyncio.sleep(0.1)
    raise RuntimeError(f"the run of case {case} did not end")


def _one_case(service: Service, case: Path) -> tuple[float, float]:
    """Readiness → claim, and readiness → the case's run final (its artifact and final state
    written: later than the folder reaching success/), of one case made ready by removing .lock."""
    (case / ".lock").touch()
    case = drop(case, service.outgoing)
    time.sleep(0.3)  # the folder event has come and gone: only the .lock removal is left
    marker = case / ".processing"
    ready, ready_epoch = time.perf_counter(), time.time()
    (case / ".lock").unlink()
    claimed = None
    while claimed is None:
        if marker.exists() or not case.is_dir():
            claimed = time.perf_counter()
        else:
            time.sleep(0.0005)
    wait_done(service, [case.name], 60)
    ended = asyncio.run(_run_end(service, case.name))
    return claimed - ready, ended - ready_epoch


def figure_cd(service: Service, out: Report, runs: int) -> None:
    """(c) per case ÷ per empty flow, interleaved; (d) readiness → claim."""
    staged = staged_cases(service, runs + 2, DUMMY, files=1, rows=32, cols=32)
    for case in staged[:2]:  # warm-up: the target's block, the first run of the flow
        _one_case(service, case)
    claims, walls, empties = [], [], []
    for case in staged[2:]:
        claim, wall = _one_case(service, case)
        claims.append(claim)
        walls.append(wall)
        _, empty = empty_rate(service, 1, 1)
        empties.extend(empty)
    ratio = median(walls) / median(empties)
    claims_sorted = sorted(claims)
    p95 = claims_sorted[min(len(claims) - 1, round(0.95 * (len(claims) - 1)))]
    say(f"(c) cases one at a time to a Dummy target, median of {runs}")
    say(
        f"    readiness -> run final, per case          {median(walls) * 1e3:6.0f} ms"
        f"  runs {fmt_runs(walls, 1e3, 0)}"
    )
    say(
        f"    empty async flow run                    {median(empties) * 1e3:6.0f} ms"
        f"  runs {fmt_runs(empties, 1e3, 0)}"
    )
    say(f"    case ÷ empty flow                       {ratio:6.2f}{mark(ratio, TARGET_C)}")
    say(
        f"(d) readiness -> claim: median {median(claims) * 1e3:.0f} ms"
        f"{mark(median(claims) * 1e3, TARGET_D_MS)}, p95 {p95 * 1e3:.0f} ms"
    )
    out.put("c.case_ms", round(median(walls) * 1e3, 1))
    out.put("c.empty_flow_ms", round(median(empties) * 1e3, 1))
    out.put("c.ratio", round(ratio, 3))
    out.put("d.claim_ms", {"median": round(median(claims) * 1e3, 1), "p95": round(p95 * 1e3, 1)})


def figure_e(work: Path, out: Report, images: int, reps: int) -> None:
    """Retrieve of one study from Orthanc: ``DicomTarget.retrieve`` (auto) ÷ ``getscu``."""
    from bench.retrieve_bench import _getscu, _run_worker
    from tests.peers.orthanc_qr import Orthanc, allow_modality, load_study

    with Orthanc(work / "orthanc") as orthanc:
        allow_modality(orthanc, "DISPATCH", 11113)
        study = load_study(orthanc, "BENCH-1", [("CT", "bench", images)], rows=512, cols=512)
        fields = {
            "ip": "127.0.0.1",
            "port": str(orthanc.dicom_port),
            "aet_target": orthanc.aet,
            "aet_source": "DISPATCH",
            "direction": "pull",
            "target_name": "bench",
        }
        ours, theirs = [], []
        for rep in range(reps):
            theirs.append(
                _getscu(orthanc.dicom_port, orthanc.aet, study.study_uid, work / f"g{rep}")
            )
            ours.append(_run_worker("dicom", fields, work / f"o{rep}")["wall"])
    ratio = median(ours) / median(theirs)
    say(f"(e) retrieve of {images} CT 512x512 from Orthanc (C-GET), median of {reps}")
    say(
        f"    getscu                                  {median(theirs):6.2f} s"
        f"  runs {fmt_runs(theirs)}"
    )
    say(
        f"    DicomTarget.retrieve, retrieve_backend auto {median(ours):6.2f} s  "
        f"{ratio:5.2f} x{mark(ratio, TARGET_E)}  runs {fmt_runs(ours)}"
    )
    out.put("e.getscu.s", round(median(theirs), 3))
    out.put("e.auto.s", round(median(ours), 3))
    out.put("e.ratio", round(ratio, 3))
