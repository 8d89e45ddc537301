"""The one error tree of dicom-dispatch.

Every foreign exception (socket, pynetdicom, OS, HTTP) is translated into one of these at the
boundary of the block that talks to the peer, so the flows decide on *kinds* of failure, never on
library internals::

    DispatchError
    ├── TargetError                 a send or test against one target failed
    │   ├── TransientTargetError    worth retrying soon: timeout, refused, abort, DIMSE 0xA7xx,
    │   │                           no response (empty DIMSE status), 5xx
    │   └── PermanentTargetError    retrying the same thing will fail again: rejected association,
    │                               authentication, DIMSE failure status, unwritable folder
    ├── CaseError                   the case folder itself is unusable (invalid task.json, ...)
    └── ConfigError                 settings are wrong or missing (unknown target, bad block)

Messages name the target and the peer, never a secret.
"""

from __future__ import annotations

__all__ = [
    "CaseError",
    "ConfigError",
    "DispatchError",
    "PermanentTargetError",
    "TargetError",
    "TransientTargetError",
]


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


class CaseError(DispatchError):
    """The case folder cannot be dispatched as it is (invalid or missing task.json, no targets)."""


class ConfigError(DispatchError):
    """The configuration is wrong: unknown target, invalid block, conflicting names."""
