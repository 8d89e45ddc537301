"""``python -m deployments.query_service``, as documented.

The module is :mod:`deployments.service.query`; this name stays for the command.
"""

from __future__ import annotations

import sys

from deployments.service.query import add_query_deployments, aretrieve_limit, main

__all__ = ["add_query_deployments", "aretrieve_limit", "main"]

if __name__ == "__main__":
    sys.exit(main())
