"""mercure 0.4.1's dispatcher loop as its own process, the reference the service is held to.

``python -m bench.dispatch.mercure_model OUTGOING SUCCESS ERROR PORT DCMSEND TIMES`` runs what
``app/dispatch/dispatcher.py`` and ``app/dispatch/send.py`` do for a one-target DICOM case, in
their order (the behaviour in the project's mercure reference, §0.1 and §1): sleep the scan
interval first (1 s), then one cycle — read the config's mtime, list outgoing/ once, keep the
ready folders (no ``.lock``/``.error``/``.processing``, ``task.json`` parses), parse each
``task.json`` again for its priority, sort by folder mtime, then for every case strictly one
after the other: HALT check, readiness and ``task.json`` again, ``.processing`` created
exclusively, an old ``sent.txt`` removed, mercure's exact ``dcmsend`` command run with
``subprocess.check_output`` (no timeout), its report checked, the dispatch status written into
``task.json``, the folder moved to success/ and ``.processing`` removed there. Then sleep again.

Left out, as they cost nothing comparable or are not reached here: bookkeeper events and
notifications (HTTP posts to services this benchmark does not run), pydantic validation (plain
``json`` instead: mercure's own CPU is, if anything, underestimated), retries and error moves.

Whether ``dcmsend`` runs with ``TCP_NODELAY=1`` is the caller's: this process passes its own
environment on. One JSON line per case goes to TIMES: the case, its ``dcmsend`` wall seconds.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from bench.dispatch.dcmsend import mercure_dcmsend
from blocks._dcmsend_report import parse_report

SCAN_INTERVAL_S = 1.0  # mercure's default dispatcher_scan_interval
MARKERS = (".lock", ".error", ".processing")
#: Set by SIGTERM: the case being sent finishes, then the loop ends (mercure's terminate check).
STOP = False


def _task(case: Path) -> dict[str, Any] | None:
    """``status.is_ready_for_sending``: a folder without markers whose task.json parses."""
    if not case.is_dir() or any((case / m).exists() for m in MARKERS):
        return None
    try:
        task: dict[str, Any] = json.loads((case / "task.json").read_text())
    except (OSError, ValueError):
        return None
    return task


def _priority(case: Path) -> str:
    """``get_priority`` parses task.json a second time; every bench case is "normal"."""
    task = json.loads((case / "task.json").read_text())
    return "urgent" if task.get("info", {}).get("applied_rule") == "urgent" else "normal"


def _send(case: Path, port: int, binary: str) -> None:
    """``DicomTargetHandler.send_to_target``: dcmsend, then the report must show every instance
    sent."""
    report = case / "sent.txt"
    subprocess.check_output(
        mercure_dcmsend(binary, case, port, report), stderr=subprocess.STDOUT, encoding="utf-8"
    )
    summary = parse_report(report.read_text())["summary"]
    if summary.get("sop_instances") != summary.get("successful"):
        raise RuntimeError(f"only {summary.get('successful')} instances of {case.name} sent")


def _execute(case: Path, success: Path, port: int, binary: str, times: Any) -> None:
    """``send.execute`` for a case with one DICOM target, on the success path."""
    task = _task(case)
    if task is None:
        return
    (case / ".processing").touch(exist_ok=False)
    (case / "sent.txt").unlink(missing_ok=True)
    started = time.perf_counter()
    _send(case, port, binary)
    sent_s = time.perf_counter() - started
    now = time.strftime("%Y-%m-%d %H:%M:%S")
    task = json.loads((case / "task.json").read_text())  # update_dispatch_status re-reads it
    targets = task["dispatch"]["target_name"]
    targets = [targets] if isinstance(targets, str) else targets
    task["dispatch"]["status"] = {t: {"state": "complete", "time": now} for t in targets}
    (case / "task.json").write_text(json.dumps(task))
    destination = success / case.name
    shutil.move(str(case), str(destination))
    (destination / ".processing").unlink()
    times.write(json.dumps({"case": case.name, "dcmsend_s": sent_s}) + "\n")
    times.flush()


def cycle(outgoing: Path, success: Path, port: int, binary: str, times: Any) -> None:
    """``dispatcher.dispatch``: one listing, then every ready case, oldest first."""
    ready = [e.path for e in os.scandir(outgoing) if _task(Path(e.path)) is not None]
    normal = [Path(p) for p in ready if _priority(Path(p)) in ("normal", "urgent")]
    normal.sort(key=os.path.getmtime)
    for case in normal:
        if (outgoing / "HALT").exists() or STOP:
            break
        _execute(case, success, port, binary, times)


def main(argv: list[str]) -> int:
    outgoing, success, _error, port, binary, times_path = argv
    config = Path(outgoing).parent / "mercure.json"

    def stop(*_: object) -> None:
        global STOP
        STOP = True

    signal.signal(signal.SIGTERM, stop)
    with open(times_path, "a") as times:
        print("ready", flush=True)
        while not STOP:
            time.sleep(SCAN_INTERVAL_S)  # helper.AsyncTimer sleeps first
            if config.exists():  # config.read_config(): reloads the file on a new mtime
                config.stat()
            cycle(Path(outgoing), Path(success), int(port), binary, times)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
