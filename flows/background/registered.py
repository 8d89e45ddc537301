"""Which functions are background jobs: only those a host names, never a program's entry point.

Anyone who can create a flow run on the API names the ``func`` of a job, so the executor runs
only functions registered on its own host, read from places an API user cannot write:

- ``DICOM_DISPATCH_JOBS`` (``blocks.host``): comma-separated ``module:function``, in the
  service's environment (``/etc/default/dicom-dispatch``);
- the entry-point group ``dicom_dispatch.jobs`` of the installed packages: a package (OpenREM)
  declares its job functions once, and every host where it is installed knows them.

Listing a function either way is enough. A program's entry point is never a job, even if
listed: every ``console_scripts``/``gui_scripts`` target of every installed package and anything
in ``deployments`` (the service's CLI, installers and services), or in a ``__main__`` module.
Reading the registry imports nothing (entry points are read from the packages' metadata).
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from importlib.metadata import entry_points

from blocks.host import JOBS_ENV, job_functions

__all__ = ["ENTRY_POINT_GROUP", "JobRegistry", "registered_jobs"]

LOGGER = logging.getLogger(__name__)

#: The entry-point group in which a package declares its job functions (value ``module:func``).
ENTRY_POINT_GROUP = "dicom_dispatch.jobs"
#: Entry points of programs: their targets are never jobs.
PROGRAM_GROUPS = ("console_scripts", "gui_scripts")
#: Packages that are programs and installers as a whole (``deployments.service_unit:main``
#: writes a unit file wherever it is told): nothing in them is a job.
PROGRAM_PACKAGES = ("deployments",)

_IDENTIFIER = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_MODULE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*$")
_warned: set[str] = set()


@dataclass(frozen=True)
class JobRegistry:
    """The functions this host runs as jobs, and the programs' entry points it never runs."""

    jobs: frozenset[str] = frozenset()
    programs: frozenset[str] = field(default_factory=frozenset, repr=False)

    def refused(self, ref: object) -> str | None:
        """Why the job ``ref`` (``module:function``) may not run here, or None. Imports nothing."""
        if not isinstance(ref, str):
            return f"func {ref!r} is not a 'module:function' reference"
        module_name, sep, name = ref.partition(":")
        if not sep or not _MODULE.match(module_name) or not _IDENTIFIER.match(name):
            return f"func {ref!r} is not of the form 'module:function'"
        if name.startswith("_"):
            return f"func {ref!r}: private functions are not run as jobs"
        if is_program(ref, self.programs):
            return f"func {ref!r} is a program's entry point (CLI, installer), never a job"
        if ref not in self.jobs:
            return (
                f"func {ref!r} is not registered as a background job on this host "
                f"(list it in {JOBS_ENV} or in the entry-point group {ENTRY_POINT_GROUP!r})"
            )
        return None


def is_program(ref: str, programs: frozenset[str]) -> bool:
    """``ref`` is a program's entry point, or lives where programs live."""
    module_name = ref.partition(":")[0]
    parts = module_name.split(".")
    in_package = any(module_name == p or module_name.startswith(f"{p}.") for p in PROGRAM_PACKAGES)
    return ref in programs or in_package or "__main__" in parts


def registered_jobs() -> JobRegistry:
    """This host's registry: ``$DICOM_DISPATCH_JOBS`` plus the ``dicom_dispatch.jobs`` entry
    points, without programs' entry points. A malformed or refused entry is skipped with one
    warning (the others still run)."""
    programs = frozenset(
        f"{ep.module}:{ep.attr}" for group in PROGRAM_GROUPS for ep in entry_points(group=group)
    )
    listed = [(ref, JOBS_ENV) for ref in job_functions()]
    listed += [
        (f"{ep.module}:{ep.attr}", f"entry point {ep.name!r} of {ENTRY_POINT_GROUP}")
        for ep in entry_points(group=ENTRY_POINT_GROUP)
    ]
    jobs = set()
    for ref, source in listed:
        reason = JobRegistry(frozenset({ref}), programs).refused(ref)
        if reason is None:
            jobs.add(ref)
        elif ref not in _warned:
            _warned.add(ref)
            LOGGER.warning("%s: %s; not registered", source, reason)
    return JobRegistry(frozenset(jobs), programs)
