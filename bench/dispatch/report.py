"""The figures as printed and as written by ``--json``: target marks and the API request table."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from bench._common import median, say
from bench.dispatch.config import TARGET_A
from bench.dispatch.meters import ApiTrace


@dataclass
class Report:
    """Every figure measured, for the summary and ``--json``."""

    figures: dict[str, Any] = field(default_factory=dict)

    def put(self, key: str, value: Any) -> None:
        self.figures[key] = value


def mark(ratio: float, target: float = TARGET_A, higher_is_better: bool = False) -> str:
    ok = ratio >= target if higher_is_better else ratio <= target
    return "  (target met)" if ok else "  (target NOT met)"


def print_trace(trace: ApiTrace, cases: int, label: str) -> dict[str, Any]:
    """Print the requests per case, the most expensive first; return them for ``--json``."""
    total = sum(len(v) for v in trace.calls.values())
    say(f"    Prefect API requests {label}: {total / cases:.1f}")
    rows = sorted(trace.calls.items(), key=lambda kv: -sum(kv[1]))
    for name, values in rows:
        say(f"      {len(values) / cases:5.2f} x {name:<54} median {median(values) * 1e3:6.1f} ms")
    say(f"      {trace.ssl_contexts / cases:5.2f} x new httpx SSL context (a new Prefect client)")
    summary: dict[str, Any] = {
        "requests_per_case": round(total / cases, 2),
        "ssl_contexts_per_case": round(trace.ssl_contexts / cases, 2),
    }
    summary.update({k: [round(len(v) / cases, 2), round(median(v) * 1e3, 2)] for k, v in rows})
    return summary
