"""Figure (g) of the service benchmark: mercure's dispatcher beside ``serve`` in the same run.

The model of mercure 0.4.1's loop (``mercure_model.py``) runs "tuned" (``TCP_NODELAY=1``) and
"as shipped" (Nagle on) over copies of the same cases, to the same ``storescp``, for the three
workloads of figures (a), (b) and (f): large cases dropped at once, small cases dropped at once,
small cases one at a time. ``serve``'s side is taken from those figures when they ran in this
run (same sizes), measured here otherwise. CPU per small case: the model's own process and its
``dcmsend`` children over the small cases at once; the service's from (f), net of idle.
"""

from __future__ import annotations

from typing import Any

from bench._common import percentile, say
from bench.dispatch.mercure_runs import SETTINGS, mercure_model
from bench.dispatch.report import Report
from bench.dispatch.service import PACS, Service, one_at_a_time
from bench.dispatch.service_figures import drop_at_once, mercure_copies, staged_cases


def _at_once(
    service: Service, out: Report, key: str, binary: str, port: int, count: int, **size: Any
) -> dict[str, Any]:
    """``count`` cases dropped at once: serve (from ``key`` or measured) and both models."""
    staged = staged_cases(service, count, PACS, **size)
    base = service.staging.parent / f"g-{key}"
    row: dict[str, Any] = {}
    for tuned, name in SETTINGS.items():
        copies = mercure_copies(staged, base / name / "staged")
        with mercure_model(base / name, port, binary, tuned) as model:
            before = model.cpu()
            row[name] = drop_at_once(model, copies, 1800)
            after = model.cpu()
        row[f"{name} cpu_ms"] = [(a - b) / count * 1e3 for a, b in zip(after, before, strict=True)]
    measured = out.figures.get(key)
    row["serve"] = measured if measured is not None else drop_at_once(service, staged, 1800)
    return row


def _one_by_one(
    service: Service, out: Report, binary: str, port: int, count: int
) -> dict[str, list[float]]:
    """Small cases one at a time: ready → success/ per case for serve and both models, and the
    models' own ``dcmsend`` times."""
    staged = staged_cases(service, count, PACS, files=5, rows=64, cols=64)
    base = service.staging.parent / "g-one"
    walls: dict[str, list[float]] = {}
    for tuned, name in SETTINGS.items():
        copies = mercure_copies(staged, base / name / "staged")
        with mercure_model(base / name, port, binary, tuned) as model:
            walls[name] = one_at_a_time(model, copies)
            walls[f"dcmsend {name}"] = model.dcmsend_s([c.name for c in copies])
    known = out.figures.get("f.ready_to_success_s")
    walls["serve"] = [] if known else one_at_a_time(service, staged)
    return walls


def figure_g(service: Service, out: Report, binary: str, port: int, sizes: dict[str, int]) -> None:
    """mercure model tuned / as shipped beside serve; ratios serve ÷ each."""
    big = _at_once(
        service,
        out,
        "a.serve.s",
        binary,
        port,
        sizes["big_cases"],
        files=sizes["big_files"],
        rows=512,
        cols=512,
    )
    small = _at_once(
        service, out, "b.serve.s", binary, port, sizes["small_cases"], files=5, rows=64, cols=64
    )
    one = _one_by_one(service, out, binary, port, sizes["one_cases"])
    known = out.figures.get("f.ready_to_success_s")
    p50 = {k: percentile(v, 0.5) for k, v in one.items()}
    p95 = {k: percentile(v, 0.95) for k, v in one.items()}
    if known:
        p50["serve"], p95["serve"] = known["p50"], known["p95"]

    say(
        "(g) mercure 0.4.1's dispatcher loop (model: list once, one dcmsend per case in turn,"
        " 1 s sleep) beside serve, same cases, same storescp"
    )
    say(
        f"    {'workload':<40} {'serve':>8} {'tuned':>8} {'shipped':>8}"
        f" {'÷tuned':>7} {'÷shipped':>8}"
    )
    rows = {
        f"{sizes['big_cases']} x {sizes['big_files']} CT 512x512 at once (s)": big,
        f"{sizes['small_cases']} x 5 small at once (s)": small,
        f"{sizes['one_cases']} small one at a time, p50 (s)": p50,
        f"{sizes['one_cases']} small one at a time, p95 (s)": p95,
    }
    table: dict[str, dict[str, float]] = {}
    for label, row in rows.items():
        ours, tuned, shipped = row["serve"], row["tuned"], row["as shipped"]
        say(
            f"    {label:<40} {ours:8.3f} {tuned:8.3f} {shipped:8.3f}"
            f" {ours / tuned:7.2f} {ours / shipped:8.2f}"
        )
        table[label] = {"serve": ours, "tuned": tuned, "as shipped": shipped}
    for name in SETTINGS.values():
        sends = one[f"dcmsend {name}"]
        say(
            f"    dcmsend per small case, {name:<12} p50 {percentile(sends, 0.5) * 1e3:5.0f} ms"
            f"  p95 {percentile(sends, 0.95) * 1e3:5.0f} ms (timed inside the model)"
        )
    cpu = out.figures.get("f.cpu_ms", {}).get("total")
    ours_ms = cpu[1] if cpu else float("nan")
    for name in SETTINGS.values():
        own, children = small[f"{name} cpu_ms"]
        say(
            f"    CPU ms per small case, model {name:<10}: own {own:5.1f} + dcmsend"
            f" {children:5.1f} = {own + children:5.1f}; serve ÷ model"
            f" {ours_ms / (own + children):6.1f} (serve from (f), net of idle)"
        )
        table[f"cpu_ms {name}"] = {"own": own, "dcmsend": children}
    out.put("g", table)


def sizes(quick: bool) -> dict[str, int]:
    """The same sizes as figures (a), (b) and (f), so their ``serve`` numbers can be reused."""
    if quick:
        return {"big_cases": 5, "big_files": 100, "small_cases": 40, "one_cases": 10}
    return {"big_cases": 5, "big_files": 200, "small_cases": 100, "one_cases": 25}
