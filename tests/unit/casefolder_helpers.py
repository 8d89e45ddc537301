"""What the tests of tasks/casefolder.py share: task variants, a scan with fixed rule priorities,
and aging a folder.

tasks/casefolder.py is mercure's case-folder protocol, with the quirks fixed per architecture
§4.1; its tests are split by topic: order, scan, claims, status, moves.
"""

from __future__ import annotations

import copy
import json
import os
import time
from pathlib import Path
from typing import Any

from tasks.casefolder import scan_outgoing

from .mercure_task import MERCURE_TASK

STAMP_RE = r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d"
PRIORITIES = {"stroke": "urgent", "ct_to_pacs": "normal", "research": "offpeak"}
GRACE = 600.0


def load(case: Path) -> dict[str, Any]:
    return json.loads((case / "task.json").read_text(encoding="utf-8"))


def task_with(*, applied: str = "", triggered: Any = None, **dispatch: Any) -> dict[str, Any]:
    raw = copy.deepcopy(MERCURE_TASK)
    raw["info"]["applied_rule"] = applied
    if triggered is not None:
        raw["info"]["triggered_rules"] = triggered
    raw["dispatch"].update(dispatch)
    return raw


def scan(outgoing: Path, **kw: Any):
    return scan_outgoing(outgoing, rule_priorities=PRIORITIES, invalid_grace=GRACE, **kw)


def age(path: Path, seconds: float) -> None:
    """Make a folder (and its task.json) look untouched for ``seconds``."""
    old = time.time() - seconds
    for p in (path / "task.json", path):
        if p.exists():
            os.utime(p, (old, old))
