"""Who may use the Prefect API: the auth string, the UI's origin, loopback checks.

Block secrets (target passwords, keys) are readable through the API and a flow run's parameters
decide what runs, so the server ``serve`` starts always requires an auth string: generated on
first start, kept 0600 in the data directory, given to the server as
``PREFECT_SERVER_API_AUTH_STRING`` and to every client (CLI, service, job processes) as
``PREFECT_API_AUTH_STRING``. The UI asks for it on its login page. Cross-origin requests are
allowed only from the UI's own origin, so a web page in an operator's browser cannot call the API.

No Prefect here: these variables must be set before Prefect is imported.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import secrets
from pathlib import Path
from urllib.parse import urlsplit

from blocks.host import write_private_file

__all__ = [
    "AUTH_FILE",
    "CLIENT_AUTH_ENV",
    "SERVER_AUTH_ENV",
    "ensure_auth_string",
    "is_loopback",
    "is_loopback_url",
    "read_auth_string",
    "server_access_env",
    "use_auth_string",
]

LOGGER = logging.getLogger(__name__)

#: The auth string's file in the data directory (0600).
AUTH_FILE = "api-auth-string"
SERVER_AUTH_ENV = "PREFECT_SERVER_API_AUTH_STRING"
CLIENT_AUTH_ENV = "PREFECT_API_AUTH_STRING"
CORS_ENV = "PREFECT_SERVER_API_CORS_ALLOWED_ORIGINS"


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def is_loopback_url(url: str) -> bool:
    return is_loopback(urlsplit(url).hostname or "")


def read_auth_string(home: Path) -> str | None:
    try:
        text = (home / AUTH_FILE).read_text().strip()
    except OSError:
        return None
    return text or None


def ensure_auth_string(home: Path) -> str:
    """The server's auth string: the one the environment sets, else the stored one, else new.

    Whatever is used is stored, so CLI commands in another environment find it.
    """
    given = os.environ.get(SERVER_AUTH_ENV, "").strip()
    stored = read_auth_string(home)
    value = given or stored or f"admin:{secrets.token_urlsafe(24)}"
    if value != stored:
        write_private_file(home / AUTH_FILE, value + "\n")
    return value


def use_auth_string(home: Path) -> None:
    """Give this process (a client of this data directory's server) the stored auth string.

    Called only when the API is the one ``serve`` started here: the string is never sent to
    another server. A ``PREFECT_API_AUTH_STRING`` the user set always wins.
    """
    value = read_auth_string(home)
    if value is not None and not os.environ.get(CLIENT_AUTH_ENV):
        os.environ[CLIENT_AUTH_ENV] = value


def server_access_env(host: str, port: int, auth_string: str) -> dict[str, str]:
    """The server child's variables: its auth string and the UI's own origin(s) for CORS."""
    origins = [f"http://{host}:{port}"]
    if is_loopback(host):
        origins += [f"http://{h}:{port}" for h in ("127.0.0.1", "localhost") if h != host]
    return {SERVER_AUTH_ENV: auth_string, CORS_ENV: ",".join(origins)}


def external_api_warning(api_url: str) -> str | None:
    """Whether ``serve`` may use an external API: None if it has an auth string; a warning
    for one on loopback without; ``ValueError`` for one elsewhere without (anyone on the
    network could read the block secrets and start runs)."""
    if os.environ.get(CLIENT_AUTH_ENV):
        return None
    if not is_loopback_url(api_url):
        raise ValueError(
            f"refusing to use {api_url} without an auth string: set {CLIENT_AUTH_ENV} "
            "(the server's PREFECT_SERVER_API_AUTH_STRING)"
        )
    return (
        f"warning: {api_url} is used without an auth string; any local user can read the "
        f"block secrets through it (set {CLIENT_AUTH_ENV} and the server's "
        f"{SERVER_AUTH_ENV})"
    )
