"""How long the Prefect server ``serve`` starts keeps run history: Prefect's own ``db_vacuum``.

Every case leaves a flow run, its task runs, logs and an artifact; over years that is the
database's growth. Prefect 3.8's ``db_vacuum`` service deletes finished top-level flow runs
whose end is older than its retention period, with their logs and artifacts (child runs and
runs still going are never touched; Prefect refuses a retention of one hour or less). It is off
for flow runs unless enabled, so the server we start is told to run it with the retention of
``$DICOM_DISPATCH_HISTORY_RETENTION`` (``blocks.host``: the server reads it as it starts, before
any block could be loaded from it). A ``PREFECT_SERVER_SERVICES_DB_VACUUM_*`` value the site set
itself wins. A server of the site's own (``PREFECT_API_URL``) is configured by the site.
"""

from __future__ import annotations

from collections.abc import Mapping

from blocks.host import history_retention_seconds

__all__ = ["VACUUM_ENABLED_ENV", "VACUUM_RETENTION_ENV", "vacuum_environment"]

VACUUM_ENABLED_ENV = "PREFECT_SERVER_SERVICES_DB_VACUUM_ENABLED"
VACUUM_RETENTION_ENV = "PREFECT_SERVER_SERVICES_DB_VACUUM_RETENTION_PERIOD"
#: Prefect's default (events) plus flow runs; flow runs imply orphaned logs and artifacts.
VACUUM_TYPES = "events,flow_runs"


def vacuum_environment(environ: Mapping[str, str]) -> dict[str, str]:
    """The variables to add to the server's environment (none when history is kept forever)."""
    retention = history_retention_seconds()
    if retention <= 0:
        return {}
    wanted = {VACUUM_ENABLED_ENV: VACUUM_TYPES, VACUUM_RETENTION_ENV: f"{retention:.0f}"}
    return {name: value for name, value in wanted.items() if not environ.get(name)}
