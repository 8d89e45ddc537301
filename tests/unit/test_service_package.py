"""The service package: one API choice, documented module commands kept, loggers by module."""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from deployments.service.api import ApiChoice, decide_api, use_api

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    monkeypatch.delenv("PREFECT_PROFILE", raising=False)
    monkeypatch.setenv("PREFECT_HOME", str(tmp_path / "prefect"))
    return tmp_path


def _record(home: Path, pid: int, url: str = "http://127.0.0.1:1/api") -> None:
    (home / "service.json").write_text(json.dumps({"pid": pid, "api_url": url, "ui_url": url}))


def test_a_configured_api_wins_for_every_purpose(
    home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PREFECT_API_URL", "https://prefect.example.org/api")
    _record(home, os.getpid())
    for purpose in ("serve", "client", "executor"):
        choice = decide_api(home, purpose)  # type: ignore[arg-type]
        assert (choice.kind, choice.url) == ("configured", "https://prefect.example.org/api")
        assert not choice.ours  # another server: this data directory's auth string stays home


def test_the_active_profile_counts_as_configured(home: Path) -> None:
    (home / "prefect").mkdir()
    (home / "prefect" / "profiles.toml").write_text(
        'active = "site"\n[profiles.site]\nPREFECT_API_URL = "http://10.0.0.5:4200/api"\n'
    )
    assert decide_api(home, "serve") == ApiChoice("configured", "http://10.0.0.5:4200/api")


def test_without_one_serve_starts_its_own_and_an_executor_joins_the_running_service(
    home: Path,
) -> None:
    assert decide_api(home, "serve").kind == "embedded"
    assert decide_api(home, "executor").kind == "none"  # nothing to join: it says so, exit 2
    _record(home, os.getpid(), "http://127.0.0.1:4201/api")
    # The executor takes the service's server even while it restarts (it waits for it).
    assert decide_api(home, "executor") == ApiChoice("service", "http://127.0.0.1:4201/api", True)


def test_a_record_of_a_dead_serve_is_no_service(home: Path) -> None:
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], check=True,
                          capture_output=True, text=True)  # fmt: skip
    _record(home, int(dead.stdout))
    assert decide_api(home, "executor").kind == "none"


def test_using_a_service_choice_sets_its_url_and_auth(
    home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Registered with monkeypatch so that what use_api sets is undone after the test.
    monkeypatch.setenv("PREFECT_API_URL", "")
    monkeypatch.setenv("PREFECT_API_AUTH_STRING", "")
    (home / "api-auth-string").write_text("s3cret\n")
    (home / "api-auth-string").chmod(0o600)
    use_api(home, ApiChoice("service", "http://127.0.0.1:4201/api", True))
    assert os.environ["PREFECT_API_URL"] == "http://127.0.0.1:4201/api"
    assert os.environ.get("PREFECT_API_AUTH_STRING") == "s3cret"


@pytest.mark.parametrize(
    ("module", "prog"),
    [
        ("deployments.background_service", "python -m deployments.background_service"),
        ("deployments.query_service", "python -m deployments.query_service"),
    ],
)
def test_the_documented_module_commands_still_run(module: str, prog: str) -> None:
    done = subprocess.run(
        [sys.executable, "-m", module, "--help"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.startswith(f"usage: {prog}")


def test_every_logger_is_named_after_its_module() -> None:
    named = []
    for package in ("blocks", "tasks", "flows", "deployments"):
        for path in sorted((ROOT / package).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text(), str(path))):
                if (
                    isinstance(node, ast.Call)
                    and ast.unparse(node.func) == "logging.getLogger"
                    and node.args
                    and isinstance(node.args[0], ast.Constant)
                    and path != ROOT / "deployments" / "service" / "log.py"
                ):
                    named.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    assert not named, f"getLogger with a name of its own (use __name__): {named}"
