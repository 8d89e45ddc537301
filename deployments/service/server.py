"""The local Prefect server that ``serve`` starts when no ``PREFECT_API_URL`` is set.

A child process (``prefect server start``) on the embedded PostgreSQL, with filesystem lease
storage (memory leases leak concurrency slots on restart) and the UI told its real API address
(the UI does not follow ``--port`` by itself). ``env`` adds the child's own variables (its auth
string, CORS origin, encryption key) without putting them in this process's environment.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Mapping
from pathlib import Path

from deployments.service.history_vacuum import vacuum_environment
from deployments.service.server_tuning import tuning_environment

__all__ = ["PrefectServer"]

HEALTH_TIMEOUT = 180.0


class PrefectServer:
    """``prefect server start`` as a child process, stopped with the service."""

    def __init__(
        self, host: str, port: int, log_file: Path, env: Mapping[str, str] | None = None
    ) -> None:
        self.host = host
        self.port = port
        self.log_file = log_file
        self.env = dict(env or {})
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def api_url(self) -> str:
        return f"http://{self.host}:{self.port}/api"

    @property
    def ui_url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self) -> None:
        self.launch()
        self.wait_healthy()

    def launch(self) -> None:
        """Start the child without waiting for it to answer."""
        env = dict(os.environ)
        env.pop("PREFECT_API_URL", None)
        env["PREFECT_UI_API_URL"] = self.api_url
        env["PREFECT_SERVER_API_HOST"] = self.host
        env["PREFECT_SERVER_API_PORT"] = str(self.port)
        env.update(self.env)
        env.update(
            vacuum_environment(env)
        )  # run history retention (deployments/service/history_vacuum.py)
        env.update(tuning_environment(env))  # measured: deployments/service/server_tuning.py
        self.log_file.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_file, "ab") as log:
            self.process = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "prefect",
                    "server",
                    "start",
                    "--host",
                    self.host,
                    "--port",
                    str(self.port),
                ],
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )

    def wait_healthy(self, timeout: float = HEALTH_TIMEOUT) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process is not None and self.process.poll() is not None:
                raise RuntimeError(
                    f"the Prefect server exited with code {self.process.returncode}; "
                    f"see {self.log_file}"
                )
            try:
                with urllib.request.urlopen(f"{self.api_url}/health", timeout=2) as resp:  # noqa: S310 - loopback
                    if resp.status == 200:
                        return
            except OSError:
                pass
            time.sleep(0.3)
        raise RuntimeError(f"the Prefect server did not become healthy in {timeout:.0f} s")

    def stop(self, timeout: float = 20.0) -> None:
        proc = self.process
        if proc is None or proc.poll() is not None:
            return
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(5)
