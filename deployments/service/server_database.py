"""``python -m deployments.service.server_database``: the Prefect database made ready, once.

Run by ``serve --api-processes N`` before its API processes start, in their environment
(``deployments/service/server.py``): migrations and Prefect's block types, which a single
server does as it starts, but N processes starting at once would do N times over the same
rows. A process of its own, so that ``serve`` never loads Prefect's server into itself.
"""

from __future__ import annotations

import asyncio

from blocks.prefect_internals import prepare_server_database

if __name__ == "__main__":
    asyncio.run(prepare_server_database())
