"""The rooms keep their shape: imports point down, private modules stay home, cores need no Prefect.

architecture §2.3. Read from the source (no import of the checked modules), except the
Prefect-free check, which imports the cores in a fresh interpreter.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("blocks", "tasks", "flows", "deployments")
#: The pure bottom: what every other room may use, and which uses nothing above it.
BOTTOM = {
    "blocks.errors",
    "blocks.host",
    "tasks.taskjson",
    "tasks.casefolder",
    "tasks.safefiles",
    "tasks.claims",
    "tasks.periodic",
}
#: Modules that must import without Prefect (unit-testable, usable from any script).
PREFECT_FREE = sorted(
    BOTTOM
    | {
        "blocks.qr",
        "tasks.tags",
        "tasks.attempt",
        "tasks.attempt_claim",
        # Imported before the environment (API URL, auth string) is decided: Prefect reads its
        # settings once, at import, so importing it here would freeze the wrong ones.
        "deployments.cli",
        "deployments.service.serve",
        "deployments.service",
        "deployments.service.api",
        "deployments.service.database",
        "deployments.service.metrics_endpoint",
        "blocks._association",
        "blocks._commitment",
        "blocks._commitment_record",
        "blocks._commitment_scp",
        "blocks._dcmsend",
        "blocks._dcmsend_report",
        "blocks._dcmtk_qr",
        "blocks._dicomweb_qr",
        "blocks._dimse",
        "blocks._dimse_qr",
        "blocks._dimse_results",
        "blocks._dimse_tls",
        "blocks._net",
        "blocks._process_pool",
        "blocks._pynetdicom_fix",
        "blocks._receiver",
        "blocks._stow",
        "blocks._storage_scp",
        "tasks.cleaner",
        "blocks._transfer_backend",
        "blocks._peer_gate",
        "flows._wakeup",
    }
)


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def rank(module: str) -> int:
    """0 bottom, 1 blocks, 2 tasks, 3 flows, 4 deployments."""
    if module in BOTTOM:
        return 0
    return {"blocks": 1, "tasks": 2, "flows": 3, "deployments": 4}[module.split(".")[0]]


def our_imports(path: Path) -> set[str]:
    """Every module of ours that ``path`` imports, anywhere in the file (TYPE_CHECKING too)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
        for name in names:
            if name.split(".")[0] in PACKAGES and _is_module(name):
                found.add(name)
    return found


def _is_module(name: str) -> bool:
    path = ROOT.joinpath(*name.split("."))
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


SOURCES = sorted(p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py"))


def upward_imports(path: Path) -> list[str]:
    """The modules of a higher layer that ``path`` imports (its own package's are allowed)."""
    me = module_name(path)
    return sorted(
        other
        for other in our_imports(path)
        if other.split(".")[0] != me.split(".")[0] or me in BOTTOM
        if rank(other) > rank(me)
    )


def foreign_private_imports(path: Path) -> list[str]:
    """The private modules (``_x``) of another package that ``path`` imports."""
    me = module_name(path)
    foreign = []
    for other in our_imports(path):
        parts = other.split(".")
        for i, part in enumerate(parts):
            if part.startswith("_") and not part.startswith("__"):
                home = ".".join(parts[:i])
                if not (me == home or me.startswith(home + ".")):
                    foreign.append(other)
                break
    return sorted(foreign)


def test_imports_keep_the_layers() -> None:
    """One check over every module, reporting every offender at once."""
    offences = []
    for path in SOURCES:
        me = module_name(path)
        if upward := upward_imports(path):
            offences.append(f"{me} imports from a higher layer: {upward}")
        if foreign := foreign_private_imports(path):
            offences.append(f"{me} imports private modules of another package: {foreign}")
    assert SOURCES, "no sources found"
    assert not offences, "\n".join(offences)


def test_cores_do_not_import_prefect() -> None:
    code = (
        "import sys, importlib\n"
        f"for name in {PREFECT_FREE!r}:\n"
        "    importlib.import_module(name)\n"
        "bad = sorted(m for m in sys.modules if m == 'prefect' or m.startswith('prefect.'))\n"
        "assert not bad, bad[:5]\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr[-2000:]
