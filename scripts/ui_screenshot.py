"""A headless Chromium screenshot of the running service's Prefect UI, logged in.

The UI asks for the API's auth string on its login page and keeps it (base64) in the page's
``localStorage["prefect-password"]``; this script puts it there through Chromium's DevTools
protocol, then opens the page and captures it. Used by ``scripts/ui-screenshot``.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

import websockets

SETTLE_SECONDS = 12.0


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _service(home: Path) -> tuple[str, str]:
    """The UI's address and the auth string ("" when the API needs none)."""
    ui = "http://127.0.0.1:4200"
    record = home / "service.json"
    if record.exists():
        ui = str(json.loads(record.read_text())["ui_url"])
    auth_file = home / "api-auth-string"
    return ui.rstrip("/"), auth_file.read_text().strip() if auth_file.exists() else ""


class _Page:
    """One DevTools page session: numbered commands, answers matched by id."""

    def __init__(self, ws: Any) -> None:
        self.ws = ws
        self.next_id = 0

    async def call(self, method: str, **params: Any) -> dict[str, Any]:
        self.next_id += 1
        await self.ws.send(json.dumps({"id": self.next_id, "method": method, "params": params}))
        while True:
            answer = json.loads(await asyncio.wait_for(self.ws.recv(), 60))
            if answer.get("id") == self.next_id:
                return dict(answer.get("result", {}))


async def _shoot(debug_port: int, ui: str, auth: str, page: str, out: Path) -> None:
    with urllib.request.urlopen(f"http://127.0.0.1:{debug_port}/json/list", timeout=10) as r:
        target = next(t for t in json.load(r) if t.get("type") == "page")
    async with websockets.connect(target["webSocketDebuggerUrl"], max_size=None) as ws:
        tab = _Page(ws)
        await tab.call(
            "Emulation.setDeviceMetricsOverride",
            width=1400,
            height=1000,
            deviceScaleFactor=1,
            mobile=False,
        )
        await tab.call("Page.navigate", url=f"{ui}/robots.txt")  # the UI's origin, no app
        await asyncio.sleep(1.0)
        secret = base64.b64encode(auth.encode()).decode()
        await tab.call(
            "Runtime.evaluate",
            expression=(
                f"localStorage.setItem('prefect-password', {json.dumps(secret)})"
                if auth
                else "localStorage.removeItem('prefect-password')"
            ),
        )
        await tab.call("Page.navigate", url=f"{ui}/{page.lstrip('/')}")
        await asyncio.sleep(SETTLE_SECONDS)
        shot = await tab.call("Page.captureScreenshot", format="png")
        out.write_bytes(base64.b64decode(shot["data"]))


def main(argv: list[str]) -> int:
    page = argv[0] if argv else "runs"
    out = Path(argv[1] if len(argv) > 1 else "ui.png")
    home = Path(os.environ.get("DICOM_DISPATCH_HOME") or Path.home() / ".dicom-dispatch")
    ui, auth = _service(home)
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        print("ui-screenshot: chromium is not installed", file=sys.stderr)
        return 1
    port = _free_port()
    with tempfile.TemporaryDirectory() as profile:
        browser = subprocess.Popen(
            [
                chromium,
                "--headless=new",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-quic",
                "--no-first-run",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                f"--user-data-dir={profile}",
                f"--remote-debugging-port={port}",
                "about:blank",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            deadline = time.monotonic() + 30
            while True:
                try:
                    socket.create_connection(("127.0.0.1", port), timeout=1).close()
                    break
                except OSError:
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.2)
            asyncio.run(_shoot(port, ui, auth, page, out))
        finally:
            browser.terminate()
            browser.wait(10)
    print(f"{out}: {ui}/{page}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
