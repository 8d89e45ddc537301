"""``dicom-dispatch``: the command line (architecture §4.5).

One parser, three verb families (:mod:`.dispatch`, :mod:`.query`, :mod:`.jobs`) on one core
(:mod:`.core`: exit codes, error lines, tables, JSON, progress). Prefect is imported only by the
commands that need it, after the data directory and the API have been chosen, so ``--help`` and
``--version`` are instant and start nothing.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from deployments.cli.core import PROG, report_failure, run, version
from deployments.cli.dispatch import (
    add_dispatch_parsers,
    add_install_service_parser,
    add_serve_parser,
)
from deployments.cli.jobs import add_jobs_parser
from deployments.cli.query import add_query_parsers
from deployments.service.api import choose_api, prepare_environment

__all__ = ["build_parser", "main"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Deliver DICOM cases from a mercure outgoing folder, orchestrated by Prefect.",
    )
    parser.add_argument("--version", action="version", version=f"{PROG} {version()}")
    parser.set_defaults(needs_api=True)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    add_dispatch_parsers(sub)
    add_query_parsers(sub)
    add_jobs_parser(sub)
    add_serve_parser(sub)
    add_install_service_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Parse (usage errors exit 2 here), choose the data directory and the API, run."""
    args = build_parser().parse_args(argv)
    try:
        home = prepare_environment()
    except Exception as exc:  # a data directory it cannot create or enter
        return report_failure(exc)
    return run(args, home, before=(lambda: choose_api(home)) if args.needs_api else None)
