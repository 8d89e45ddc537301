"""Which functions background jobs run: those a host registers, never a program's entry point.

The entry points come from a real package's metadata (a ``.dist-info`` folder put on
``sys.path``), read by ``importlib.metadata`` as for any installed package.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from blocks.host import JOBS_ENV
from flows.background.checks import refused_func
from flows.background.registered import ENTRY_POINT_GROUP, registered_jobs


@pytest.fixture
def site_package(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An installed package ``sitejobs`` declaring two jobs, one of them also its CLI."""
    info = tmp_path / "sitejobs-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: sitejobs\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text(
        "[console_scripts]\n"
        "sitejobs = sitejobs.cli:main\n"
        f"[{ENTRY_POINT_GROUP}]\n"
        "export = sitejobs.exports:export_ct\n"
        "cli = sitejobs.cli:main\n"
        "bad = sitejobs.exports:Exporter.run\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    return tmp_path


def test_only_listed_functions_are_jobs(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(JOBS_ENV, " remapp.tools:import_rdsr , remapp.x:_private,,not a ref ")
    registry = registered_jobs()
    assert refused_func("remapp.tools:import_rdsr", registry) is None
    assert "not registered" in (refused_func("remapp.tools:export_ct", registry) or "")
    assert "not registered" in (refused_func("os:system", registry) or "")
    assert "private" in (refused_func("remapp.x:_private", registry) or "")
    assert "module:function" in (refused_func("remapp.tools", registry) or "")
    assert "module:function" in (refused_func(42, registry) or "")
    assert "remapp.tools" not in sys.modules, "reading the registry imports nothing"


def test_nothing_is_a_job_by_default(monkeypatch: pytest.MonkeyPatch) -> None:
    """The project's own packages are no longer allowed wholesale."""
    monkeypatch.delenv(JOBS_ENV, raising=False)
    registry = registered_jobs()
    for ref in ("tasks.cleaner:clean_once", "flows.dispatch:run_dispatch", "blocks.host:data_dir"):
        assert refused_func(ref, registry) is not None, ref


@pytest.mark.parametrize(
    "ref",
    [
        "deployments.service_unit:main",
        "deployments.service_unit:install_unit",
        "deployments.cli:main",
        "deployments.cli.jobs:main",
        "deployments.importer:import_mercure_config",
        "pip.__main__:main",
    ],
)
def test_programs_are_never_jobs_even_if_listed(monkeypatch: pytest.MonkeyPatch, ref: str) -> None:
    monkeypatch.setenv(JOBS_ENV, ref)
    registry = registered_jobs()
    assert ref not in registry.jobs
    assert "never a job" in (refused_func(ref, registry) or "")


def test_a_package_declares_its_jobs_in_entry_points(
    site_package: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv(JOBS_ENV, raising=False)
    registry = registered_jobs()
    assert refused_func("sitejobs.exports:export_ct", registry) is None
    # its CLI is a console script: never a job, though the package declared it one too
    assert "never a job" in (refused_func("sitejobs.cli:main", registry) or "")
    assert "sitejobs.exports:Exporter.run" not in registry.jobs
    # any package's console script, ours included
    assert "never a job" in (refused_func("deployments.cli:main", registry) or "")
    assert "sitejobs" not in sys.modules


def test_either_way_is_enough(site_package: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(JOBS_ENV, "remapp.tools:import_rdsr")
    registry = registered_jobs()
    assert registry.jobs == {"remapp.tools:import_rdsr", "sitejobs.exports:export_ct"}


def test_jobs_modules_in_the_settings_is_ignored(monkeypatch: pytest.MonkeyPatch) -> None:
    """An old ``jobs_modules`` allowing whole packages (in the block anyone with the API key can
    edit) lets nothing more run: the executor's settings carry only the host's registry."""
    from blocks.settings import DispatcherSettings
    from flows.background.settings import ExecutorSettings

    monkeypatch.setenv(JOBS_ENV, "tests.jobs_fixtures:quick")
    old = DispatcherSettings(jobs_modules=["tests", "os", "deployments"])
    jobs = ExecutorSettings.of(old).jobs
    assert refused_func("tests.jobs_fixtures:quick", jobs) is None
    for ref in ("tests.jobs_fixtures:unregistered", "os:system", "deployments.cli:main"):
        assert refused_func(ref, jobs) is not None, ref
    assert DispatcherSettings().jobs_modules == [], "nothing allowed by default"
