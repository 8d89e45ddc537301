"""The one error tree of dicom-dispatch.

Every foreign exception (socket, pynetdicom, OS, HTTP) is translated into one of these at the
boundary of the block that talks to the peer, so the flows decide on *kinds* of failure, never on
library internals::

    DispatchError
    ├── TargetError                 a send or test against one target failed
    │   ├── TransientTargetError    worth retrying soon: timeout, refused, abort, DIMSE 0xA7xx,
    │   │                           no response (empty DIMSE status), 5xx
    │   ├── PermanentTargetError    retrying the same thing will fail again: rejected association,
    │   │                           authentication, DIMSE failure status, unwritable folder
    │   │   └── AccessionNotFound   the node has no series for the accession (and filters)
    │   └── NotCommittedError       sent, but not every instance committed (Storage
    │                               Commitment ``require``): retried by the next attempt only
    ├── CaseError                   the case folder itself is unusable (invalid task.json, ...)
    ├── ConfigError                 settings are wrong or missing (unknown target, bad block)
    ├── QueryError                  a query/retrieve request is malformed (also a ValueError)
    └── BackgroundJobError          a background-job request could not be carried out
        ├── JobRefusedError         refused before queuing: function, arguments, type, limits
        ├── JobNotFoundError        no job has this id (also a LookupError)
        └── JobNotQueuedError       the job already started or ended: it cannot be unqueued

Messages name the target and the peer, never a secret. :func:`one_line` and :func:`first_line`
are how every module shortens a foreign error for a status line, a log or an artifact; both drop
the user info of any URL in it (:func:`redact_urls`).
"""

from __future__ import annotations

import re
from urllib.parse import unquote, urlsplit, urlunsplit

__all__ = [
    "AccessionNotFound",
    "BackgroundJobError",
    "CaseError",
    "ConfigError",
    "DispatchError",
    "JobNotFoundError",
    "JobNotQueuedError",
    "JobRefusedError",
    "NotCommittedError",
    "PermanentTargetError",
    "QueryError",
    "TargetError",
    "TransientTargetError",
    "describe_error",
    "first_line",
    "one_line",
    "public_url",
    "redact_urls",
    "url_credentials",
    "without_userinfo",
]

#: Longest one-line reason kept for a task.json status, a log line or an artifact.
ONE_LINE_LIMIT = 500


class DispatchError(Exception):
    """Base of every error dicom-dispatch raises on purpose."""


class TargetError(DispatchError):
    """A send to, or a test of, one target failed."""

    transient: bool = False


class TransientTargetError(TargetError):
    """The peer may accept the same request later (timeout, refused connection, abort)."""

    transient = True


class PermanentTargetError(TargetError):
    """The peer or the data refuses the request; retrying within this attempt is pointless."""


class NotCommittedError(TargetError):
    """The files arrived but the receiver has not committed them all (Storage Commitment
    ``require``). The attempt fails and the case is retried later; never quick-retried within
    the attempt, as every try would send again and wait the whole commitment timeout."""

    transient = True


class CaseError(DispatchError):
    """The case folder cannot be dispatched as it is (invalid or missing task.json, no targets)."""


class ConfigError(DispatchError):
    """The configuration is wrong: unknown target, invalid block, conflicting names."""


class AccessionNotFound(PermanentTargetError):
    """The peer has no series for the accession number (and filters)."""


class QueryError(DispatchError, ValueError):
    """The request itself is wrong: unknown filter keyword, wildcard in an accession number."""


class BackgroundJobError(DispatchError):
    """A background-job request could not be carried out."""


class JobRefusedError(BackgroundJobError, ValueError):
    """The job was refused before anything was queued (function, arguments, type or limits)."""


class JobNotFoundError(BackgroundJobError, LookupError):
    """No background job has this id."""


class JobNotQueuedError(BackgroundJobError):
    """The job is no longer queued (it started or ended), so it cannot be removed from the queue."""


def one_line(value: object, limit: int = ONE_LINE_LIMIT, empty: str | None = None) -> str:
    """``value`` as text with every run of white space folded to one space, at most ``limit``.

    Peers answer with multi-line HTML, tracebacks and XML; a status line must stay one line.
    An empty text becomes ``empty`` (default: the value's type name).
    """
    return " ".join(redact_urls(str(value)).split())[:limit] or (empty or type(value).__name__)


def first_line(value: object) -> str:
    """The first non-empty line of ``value`` (an exception's headline), or its type's name."""
    lines = [line for line in redact_urls(str(value)).strip().splitlines() if line.strip()]
    return lines[0].strip() if lines else type(value).__name__


def describe_error(error: object, limit: int = ONE_LINE_LIMIT) -> str:
    """One line for an error: our own errors speak for themselves, others get their type name.

    ``TransientTargetError("cannot reach ...")`` reads well as is; a bare ``KeyError('x')``
    needs its type to mean anything.
    """
    if isinstance(error, DispatchError | str):
        return one_line(error, limit)
    return one_line(f"{type(error).__name__}: {error}", limit)


# -- credentials out of texts -------------------------------------------------------------
# A DICOMweb URL may carry its login as user info (``https://user:pass@host/...``). Every place
# that shows a URL uses :func:`public_url`; every one-line error text goes through
# :func:`redact_urls`, so a forgotten place still shows no password.

#: What replaces the user info of a URL in a text.
REDACTED = "***"
#: ``scheme://`` then user info up to the ``@`` before the host (no ``/``, space or ``@`` in it).
_USERINFO = re.compile(r"(?i)\b([a-z][a-z0-9+.\-]*://)[^/\s@?#]*@")


def redact_urls(text: str) -> str:
    """``text`` with the user info of every URL in it replaced by ``***``."""
    return _USERINFO.sub(rf"\1{REDACTED}@", text) if "@" in text else text


def public_url(url: str) -> str:
    """``url`` without user info, query and fragment: safe to show in logs and reasons."""
    try:
        parts = urlsplit(url)
        host = parts.hostname or ""
        if parts.port is not None:
            host = f"{host}:{parts.port}"
    except ValueError:
        return "<invalid URL>"
    return urlunsplit((parts.scheme, host, parts.path, "", ""))


def without_userinfo(url: str) -> str:
    """``url`` as it is, minus its user info (what a request is sent to)."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return redact_urls(url)
    if "@" not in parts.netloc:
        return url
    return urlunsplit(parts._replace(netloc=parts.netloc.rpartition("@")[2]))


def url_credentials(url: str) -> tuple[str, str] | None:
    """(user, password) from the user info of ``url`` (percent-decoded), or ``None``."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return None
    if parts.username is None:
        return None
    return unquote(parts.username), unquote(parts.password or "")
