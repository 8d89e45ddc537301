"""The benchmark's cases: one big CT case (a), many small ones with a copy for mercure (b)."""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.dispatch.config import Config


def make_cases(outgoing: Path, count: int, targets: list[str], **kwargs: Any) -> list[Path]:
    from tests.cases import make_case

    return [make_case(outgoing, targets, **kwargs) for _ in range(count)]


def reset_case(case: Path, outgoing: Path, pristine_task: str) -> Path:
    """Put a dispatched case back into outgoing/ as it was before the run."""
    home = outgoing / case.name
    if case != home:
        os.rename(case, home)
    for name in os.listdir(home):
        if (name.startswith("sent") and name.endswith(".txt")) or name == ".processing":
            (home / name).unlink()
    (home / "task.json").write_text(pristine_task)
    return home


@dataclass
class BenchData:
    #: (a): the big case, and a small one that warms up the sender pool untimed.
    big: Path | None = None
    warm: Path | None = None
    #: (b): mercure's copy of the small cases (ours stay in ``b/outgoing``), sorted by name.
    mercure_cases: list[Path] = field(default_factory=list)


def make_data(cfg: Config, work: Path, only: set[str]) -> BenchData:
    """Write the cases the chosen figures need below ``work``."""
    data = BenchData()
    if "a" in only:
        data.big = make_cases(
            work / "a" / "outgoing", 1, ["bench_a"], files=200, rows=512, cols=512
        )[0]
        data.warm = make_cases(work / "warm", 1, ["bench_a"], files=8, rows=64, cols=64)[0]
    if "b" in only:
        b_out = work / "b" / "outgoing"
        b_cases = make_cases(b_out, cfg.b_cases, ["bench_b"], files=5, rows=64, cols=64)
        shutil.copytree(b_out, work / "b-mercure")
        data.mercure_cases = sorted(work / "b-mercure" / c.name for c in b_cases)
    return data
