"""Host configuration: every ``DICOM_DISPATCH_*`` variable read in one place, typed, forgiving."""

from __future__ import annotations

import ast
import logging
from pathlib import Path

import pytest

from blocks import host
from blocks.host import HostSettings, host_settings

ROOT = Path(__file__).resolve().parents[2]


def test_every_variable_becomes_a_typed_field(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    for name, value in {
        "HOME": str(tmp_path),
        "HOST_ID": " node-7 ",
        "JOBS": "a.b:c, d:e",
        "METRICS_ADDRESS": "0.0.0.0",
        "METRICS_PORT": "9100",
        "HISTORY_RETENTION": "7200",
        "LOG_LEVEL": "DEBUG",
        "JOBS_POLL_SECONDS": "0.5",
    }.items():
        monkeypatch.setenv(f"DICOM_DISPATCH_{name}", value)
    settings = host_settings()
    assert settings.home == tmp_path
    assert host.host_id() == "node-7"
    assert host.job_functions() == ["a.b:c", "d:e"]
    assert host.metrics_address() == ("0.0.0.0", 9100)
    assert host.history_retention_seconds() == 7200.0
    assert host.log_level() == "DEBUG"
    assert host.deprecated_override("jobs_poll_seconds", 2.0) == 0.5
    assert host.deprecated_override("jobs_lease_seconds", 60.0) == 60.0


def test_defaults_when_unset_or_empty(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in HostSettings.model_fields:
        monkeypatch.delenv(f"DICOM_DISPATCH_{name.upper()}", raising=False)
    monkeypatch.setenv("DICOM_DISPATCH_HOST_ID", "  ")
    monkeypatch.setenv("DICOM_DISPATCH_METRICS_PORT", "")
    assert host.data_dir() == Path.home() / ".dicom-dispatch"
    assert host.host_id()  # the host name
    assert host.metrics_address() == ("127.0.0.1", 9464)
    assert host.history_retention_seconds() == host.DEFAULT_HISTORY_RETENTION
    assert host.log_level() == "INFO"
    assert host.job_functions() == []


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("abc", host.DEFAULT_HISTORY_RETENTION), ("10", 3601.0), ("0", 0.0), ("-5", 0.0)],
)
def test_a_retention_prefect_would_refuse_never_stops_the_server(
    monkeypatch: pytest.MonkeyPatch, text: str, seconds: float
) -> None:
    monkeypatch.setenv("DICOM_DISPATCH_HISTORY_RETENTION", text)
    assert host.history_retention_seconds() == seconds


def test_bad_numbers_fall_back_with_a_warning(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(host, "_warned", set())
    monkeypatch.setenv("DICOM_DISPATCH_METRICS_PORT", "http")
    monkeypatch.setenv("DICOM_DISPATCH_RETRIEVE_LIMIT", "lots")
    with caplog.at_level(logging.WARNING, logger="blocks.host"):
        assert host.metrics_address() == ("127.0.0.1", 9464)
        assert host.deprecated_override("retrieve_limit", 2) == 2
    assert len(caplog.records) == 2
    monkeypatch.setenv("DICOM_DISPATCH_METRICS_PORT", "0")
    assert host.metrics_address() is None


def test_read_once_per_state_of_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DICOM_DISPATCH_HOST_ID", "one")
    assert host_settings() is host_settings()
    monkeypatch.setenv("DICOM_DISPATCH_HOST_ID", "two")
    assert host.host_id() == "two"


def _our_variables() -> set[str]:
    """Names bound to a ``DICOM_DISPATCH_*`` string anywhere in our packages, and the strings."""
    found = set()
    for path in _sources():
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if (
                isinstance(node, ast.Assign)
                and isinstance(node.value, ast.Constant)
                and str(node.value.value).startswith(host.ENV_PREFIX)
            ):
                found |= {t.id for t in node.targets if isinstance(t, ast.Name)}
    return found


def _sources() -> list[Path]:
    return sorted(
        p for pkg in ("blocks", "tasks", "flows", "deployments") for p in (ROOT / pkg).rglob("*.py")
    )


def _is_ours(arg: ast.expr, names: set[str]) -> bool:
    if isinstance(arg, ast.Constant):
        return str(arg.value).startswith(host.ENV_PREFIX)
    return isinstance(arg, ast.Name) and arg.id in names


def test_our_variables_are_read_only_in_blocks_host() -> None:
    names = _our_variables()
    readers = []
    for path in _sources():
        if path == ROOT / "blocks" / "host.py":
            continue
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            arg: ast.expr | None = None
            if isinstance(node, ast.Call) and node.args:
                func = ast.unparse(node.func)
                if func in ("os.environ.get", "os.getenv", "environ.get", "getenv"):
                    arg = node.args[0]
            elif isinstance(node, ast.Subscript) and isinstance(node.ctx, ast.Load):
                if ast.unparse(node.value) in ("os.environ", "environ"):
                    arg = node.slice
            if arg is not None and _is_ours(arg, names):
                readers.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    assert not readers, f"read outside blocks/host.py: {readers}"
