"""CPU seconds of each part of a running ``serve``, read from outside with psutil.

``serve`` is a tree: the serve process (dispatcher 1, also the Runner, the background executor
and the periodic services), ``--workers``-1 dispatcher children, the ``dcmsend`` runs they start,
``prefect server start`` (API and its loop services in one uvicorn process; with
``--api-processes N`` N API processes under a uvicorn parent, ``prefect server services start``
and ``redis-server`` beside them) and the embedded PostgreSQL (a detached postmaster with its
backends). A figure takes a snapshot before and after
a window and divides the difference by the cases in it.

Exited processes are counted through their parent's ``children_*`` times (what the kernel adds
when the parent reaps them): a finished ``dcmsend`` through its dispatcher, a finished
PostgreSQL backend through the postmaster.
"""

from __future__ import annotations

import contextlib
from collections import defaultdict
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from bench.dispatch.service import Service

SERVE = "dispatcher (serve process)"
CHILDREN = "dispatcher children"
DCMSEND = "dcmsend"
SERVER = "Prefect server (API + services)"
SERVICES = "Prefect services process"
REDIS = "Redis"
POSTGRES = "PostgreSQL (all backends)"
CLIENT = "client (this process)"
#: Print order; ``CLIENT`` only where this process is the Prefect client measured.
GROUPS = (SERVE, CHILDREN, DCMSEND, SERVER, POSTGRES)
#: With ``--api-processes N``: ``SERVER`` is the API processes alone.
MULTI_GROUPS = (SERVE, CHILDREN, DCMSEND, SERVER, SERVICES, REDIS, POSTGRES)


def _own(proc: Any) -> tuple[float, float]:
    """(own, reaped children) CPU seconds of one process; zeros for one that is gone."""
    import psutil

    try:
        times = proc.cpu_times()
    except psutil.Error:
        return 0.0, 0.0
    return times.user + times.system, times.children_user + times.children_system


def _group_of(proc: Any, inherited: str) -> str:
    """The group of a child of the serve tree, from its command line; its parent's otherwise
    (the forkserver pool of DIMSE senders belongs to the dispatcher that started it)."""
    import psutil

    try:
        name, line = proc.name(), " ".join(proc.cmdline())
    except psutil.Error:
        return inherited
    if name == "dcmsend":
        return DCMSEND
    if "postgres" in name:  # counted from its postmaster, wherever that was started
        return POSTGRES
    if "dispatcher_child" in line:
        return CHILDREN
    if name == "redis-server":
        return REDIS
    if "prefect" in line and "server" in line:
        return SERVICES if "services start" in line else SERVER
    return inherited


def cpu_snapshot(service: Service, client: bool = False) -> dict[str, float]:
    """CPU seconds used so far by each group of ``service``'s processes (and this process, as
    ``CLIENT``, if asked)."""
    import psutil

    used: dict[str, float] = defaultdict(float)
    own, reaped = _own(psutil.Process(service.proc.pid))
    used[SERVE] += own
    used[DCMSEND] += reaped  # the serve process reaps its dcmsend runs (and nothing else busy)

    def walk(proc: Any, group: str) -> None:
        with contextlib.suppress(psutil.Error):
            for child in proc.children():
                kind = _group_of(child, group)
                if kind == POSTGRES:
                    continue
                child_own, child_reaped = _own(child)
                used[kind] += child_own
                # A dispatcher child reaps dcmsend runs; the server reaps nothing of note.
                used[DCMSEND if kind in (SERVE, CHILDREN) else kind] += child_reaped
                walk(child, kind)

    walk(psutil.Process(service.proc.pid), SERVE)
    with contextlib.suppress(OSError, ValueError, psutil.Error):
        pid_file = service.home / "postgres" / "postmaster.pid"
        postmaster = psutil.Process(int(pid_file.read_text().split()[0]))
        own, reaped = _own(postmaster)
        used[POSTGRES] += own + reaped
        for backend in postmaster.children(recursive=True):
            used[POSTGRES] += _own(backend)[0]
    if client:
        used[CLIENT] += _own(psutil.Process())[0]
    return dict(used)


def cpu_used(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    """CPU seconds per group between two snapshots (groups in print order, zeros kept)."""
    keys = [*GROUPS, *(k for k in MULTI_GROUPS if k in after and k not in GROUPS)]
    keys += [k for k in after if k not in keys]
    return {k: after.get(k, 0.0) - before.get(k, 0.0) for k in keys}
