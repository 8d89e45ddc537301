"""Figure (a): one case of 200 CT images 512x512, ``DicomTarget.send()`` and the whole
``dispatch_case`` flow run, each ÷ mercure's ``dcmsend`` on the same folder."""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench._common import fmt_runs, median, say
from bench.dispatch.config import Config
from bench.dispatch.data import reset_case
from bench.dispatch.dcmsend import run_dcmsend
from bench.dispatch.prefect_setup import dicom_target, save_target, time_case_run
from bench.dispatch.report import Report, mark

LABELS = {
    "dcmsend": "dcmsend (mercure's command) -> storescp",
    "pynetdicom-1": "send() pynetdicom, 1 association",
    "dcmsend-backend": "send() backend=dcmsend",
    "dcmsend-fork": "dcmsend -> storescp --fork",
    "pynetdicom-2": "send() pynetdicom, 2 associations (--fork)",
    "pynetdicom-4": "send() pynetdicom, 4 associations (--fork)",
}


def send_once(block: Any, case: Path, report: Path) -> float:
    """Wall seconds of one ``block.send()`` of ``case`` (the transfer, no flow around it)."""
    from blocks.base import SendContext
    from tasks.taskjson import read_task

    _, task = read_task(case)
    started = time.perf_counter()
    block.send(SendContext(case, task, report))
    return time.perf_counter() - started


def figure_a_send(
    cfg: Config, out: Report, big: Path, warm: Path, plain: Any, forked: Any, binary: str
) -> dict[str, float]:
    """DicomTarget.send() against dcmsend, interleaved rep by rep."""
    from blocks import _dimse

    size = sum(p.stat().st_size for p in big.glob("*.dcm")) / 1e6
    files = len(list(big.glob("*.dcm")))
    report = big.parent.parent.parent / "a-report.txt"

    def send_with(port: int, **fields: Any) -> Callable[[], float]:
        block = dicom_target(port, **fields)
        return lambda: send_once(block, big, report)

    configs: dict[str, Callable[[], float]] = {
        "dcmsend": lambda: run_dcmsend(binary, big, plain.port, report),
        "pynetdicom-1": send_with(plain.port),
        "dcmsend-backend": send_with(plain.port, backend="dcmsend"),
        "dcmsend-fork": lambda: run_dcmsend(binary, big, forked.port, report),
        "pynetdicom-2": send_with(forked.port, max_associations=2),
        "pynetdicom-4": send_with(forked.port, max_associations=4),
    }
    # Warm-up (not timed): imports, the forkserver pool of sender processes.
    for assoc in (4, 1):
        send_once(
            dicom_target(forked.port, max_associations=assoc), warm, warm.parent / "warm-report.txt"
        )
    runs: dict[str, list[float]] = defaultdict(list)
    for _ in range(cfg.a_reps):
        for name, fn in configs.items():
            runs[name].append(fn())
    med = {name: median(values) for name, values in runs.items()}
    say(f"(a) one case, {files} CT images 512x512, {size:.0f} MB; DicomTarget.send() = transfer")
    say(
        f"    peers: storescp TCP_NODELAY=1 (no --fork for 1 association and dcmsend;"
        f" --fork for 2/4); median of {cfg.a_reps}"
    )
    base = med["dcmsend"]
    for name, label in LABELS.items():
        ratio = med[name] / base
        is_reference = name.startswith("dcmsend") and name != "dcmsend-backend"
        say(
            f"    {label:<44} {med[name]:6.2f} s  {ratio:5.2f} x dcmsend"
            f"{'' if is_reference else mark(ratio)}   runs {fmt_runs(runs[name])}"
        )
        out.put(f"a.send.{name}.s", round(med[name], 4))
        out.put(f"a.send.{name}.ratio", round(ratio, 3))
    _dimse.shutdown_workers()
    return med


async def figure_a_flow(
    cfg: Config, out: Report, big: Path, settings: Any, plain: Any, forked: Any, dcmsend_s: float
) -> None:
    """The whole dispatch_case flow run for the big case, per backend."""
    from blocks import _dimse

    outgoing, success, _ = settings.folders()
    pristine = (big / "task.json").read_text()
    configs = {
        "pynetdicom-1": dicom_target(plain.port),
        "dcmsend-backend": dicom_target(plain.port, backend="dcmsend"),
        "pynetdicom-4": dicom_target(forked.port, max_associations=4),
    }
    say(f"    whole dispatch_case flow run (top-level, in-process), median of {cfg.a_reps}:")
    case = big
    for name, block in configs.items():
        await save_target(block, "bench_a")
        times: list[float] = []
        for rep in range(cfg.a_reps + 1):  # the first run warms up (pool, client)
            case = reset_case(case, outgoing, pristine)
            elapsed, ok = await time_case_run(case, settings)
            if not ok:
                raise RuntimeError(f"(a) flow run with {name} did not reach success/")
            case = success / case.name
            if rep:
                times.append(elapsed)
        ratio = median(times) / dcmsend_s
        say(
            f"    {'flow ' + name:<44} {median(times):6.2f} s  {ratio:5.2f} x dcmsend"
            f"{mark(ratio)}   runs {fmt_runs(times)}"
        )
        out.put(f"a.flow.{name}.s", round(median(times), 4))
        out.put(f"a.flow.{name}.ratio", round(ratio, 3))
    reset_case(case, outgoing, pristine)
    _dimse.shutdown_workers()
