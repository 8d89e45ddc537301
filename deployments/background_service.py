"""``python -m deployments.background_service``, as documented.

The module is :mod:`deployments.service.background`; this name stays for the command.
"""

from __future__ import annotations

import sys

from deployments.service.background import (
    BackgroundExecutor,
    ExecutorSettings,
    main,
    run_background_executor,
)

__all__ = ["BackgroundExecutor", "ExecutorSettings", "main", "run_background_executor"]

if __name__ == "__main__":
    sys.exit(main())
