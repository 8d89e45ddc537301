"""Sizes of a run (full or ``--quick``), the targets each figure is held to, and the peer names."""

from __future__ import annotations

from dataclasses import dataclass

TARGET_A = 1.5
TARGET_B = 1.0
TARGET_B_RSS_MB = 500.0
TARGET_C_MS = 150.0
HOST = "127.0.0.1"
SCP_AET = "STORESCP"


@dataclass
class Config:
    quick: bool
    a_reps: int
    b_cases: int
    c_runs: int
    c_runs_sqlite: int
    #: Stop (b) after this many seconds and report the rate over the cases done by then.
    b_cap_s: float


def config(quick: bool) -> Config:
    if quick:
        return Config(quick=True, a_reps=3, b_cases=50, c_runs=10, c_runs_sqlite=6, b_cap_s=90)
    return Config(quick=False, a_reps=7, b_cases=500, c_runs=25, c_runs_sqlite=12, b_cap_s=240)
