"""``DispatcherSettings``: folders, retries, off-peak window, rule priorities and notifications.

One document (default name ``default``) replaces the dispatcher part of mercure.json. Without a
document the defaults apply, with the folders under the data directory, so a fresh install needs
no configuration.
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import permutations
from pathlib import Path
from typing import Any, Literal

from prefect.blocks.core import Block
from pydantic import Field

from blocks.errors import ConfigError
from blocks.host import DEPRECATED_OVERRIDES, data_dir, deprecated_override
from blocks.qr import (
    DEFAULT_FREE_SPACE_RESERVE_BYTES,
    DEFAULT_MAX_INSTANCE_BYTES,
    ReceiveLimits,
)

__all__ = [
    "DEFAULT_SETTINGS_NAME",
    "Cleaning",
    "DispatcherSettings",
    "OffPeak",
    "SendLimits",
    "check_folder_layout",
    "data_dir",
]

DEFAULT_SETTINGS_NAME = "default"
#: Seconds before each quick retry of a transient send failure within one attempt.
DEFAULT_QUICK_RETRY_DELAYS: tuple[float, ...] = (2.0, 10.0)
Priority = Literal["normal", "urgent", "offpeak"]


@dataclass(frozen=True)
class OffPeak:
    """The off-peak window, ``HH:MM`` local (it may span midnight)."""

    start: str
    end: str


@dataclass(frozen=True)
class Cleaning:
    """The cleaner of success/: whether it runs, how long cases stay, when it hurries."""

    enabled: bool
    retention: float
    emergency_percentage: float
    scan_interval: float


@dataclass(frozen=True)
class SendLimits:
    """Sends at once across all hosts: in total and per target type (0: no limit)."""

    total: int
    per_type: dict[str, int]


class DispatcherSettings(Block):
    """How the dispatcher works: mercure's folder and retry settings plus the concurrency limits.

    The fields stay flat (scripts and the UI address them by name; new ones are flat too) but
    come in groups, in this order: each title starts with its group (``Folders: …``), and the
    code reads a group through its view (:meth:`folders`, :meth:`offpeak`, :meth:`send_limits`,
    :meth:`cleaning`, :meth:`receive_limits`).

    Example:
        ```python
        from blocks.settings import DispatcherSettings

        settings = DispatcherSettings.load("BLOCK_NAME")  # the service reads "default"
        ```
    """

    _block_type_name = "Dispatcher Settings"
    _block_type_slug = "dispatcher-settings"
    _description = "Folders, retries, off-peak, priorities, limits and retention of the dispatcher."

    # -- Folders: the three folders of mercure's protocol
    outgoing_folder: str = Field(
        title="Folders: outgoing folder",
        default="",
        description="Queue of cases (empty: outgoing/ in the data directory).",
    )
    success_folder: str = Field(
        title="Folders: success folder",
        default="",
        description="Sent cases (empty: success/ in the data directory).",
    )
    error_folder: str = Field(
        title="Folders: error folder",
        default="",
        description="Failed cases (empty: error/ in the data directory).",
    )

    # -- Dispatching: how a case is scanned, tried and retried
    dispatcher_scan_interval: float = Field(
        title="Dispatching: scan interval",
        default=1,
        gt=0,
        description="Seconds between scans of the outgoing folder.",
    )
    retry_max: int = Field(
        title="Dispatching: attempts per case",
        default=5,
        ge=0,
        description="Attempts per case before error/ (mercure).",
    )
    retry_delay: float = Field(
        title="Dispatching: delay between attempts",
        default=900,
        ge=0,
        description="Seconds between attempts of a case.",
    )
    quick_retry_delays: list[float] = Field(
        title="Dispatching: quick retries",
        default_factory=lambda: list(DEFAULT_QUICK_RETRY_DELAYS),
        description="Within one attempt, seconds before each quick retry of a transient error.",
    )
    invalid_grace_seconds: float = Field(
        title="Dispatching: grace for invalid cases",
        default=300,
        ge=0,
        description="An invalid case folder unchanged this long is moved to error/ with a reason.",
    )
    case_links_inside: bool = Field(
        title="Dispatching: links inside a case",
        default=False,
        description="Send symbolic links in a case folder that lead to a file inside it "
        "(any other link sends the case to error/).",
    )

    # -- Priorities: which cases go first
    rule_priorities: dict[str, Priority] = Field(
        title="Priorities: priority per rule",
        default_factory=dict,
        description="Priority of each mercure rule by name.",
    )
    offpeak_start: str = Field(
        title="Priorities: off-peak start",
        default="22:00",
        description="Off-peak window start, HH:MM local.",
    )
    offpeak_end: str = Field(
        title="Priorities: off-peak end",
        default="06:00",
        description="Off-peak window end, HH:MM local.",
    )

    # -- Limits: sends at once, across all hosts
    num_proc: int = Field(
        title="Limits: sends at once",
        default=8,
        ge=0,
        description="At most this many sends at once in total (0: no limit).",
    )
    type_limits: dict[str, int] = Field(
        title="Limits: sends at once per target type",
        default_factory=dict,
        description="At most this many sends at once per target type, e.g. {'dicom': 4}.",
    )

    # -- Service: several hosts, stopping
    takeover_window_seconds: int = Field(
        title="Service: takeover window",
        default=90,
        ge=45,
        le=150,
        description=(
            "A dead host's case is taken over when its flow run has had no heartbeat and its "
            "claim no refresh for this long (also the zombie-run automation's window)."
        ),
    )
    shutdown_grace_seconds: float = Field(
        title="Service: shutdown grace",
        default=10,
        ge=0,
        le=60,
        description="On stop, in-flight sends get this long; then they are aborted (the attempt "
        "is recorded, the claim released). The service exits within 15 s (grace capped to fit).",
    )

    # -- Privacy: what patient data Prefect and notifications see
    mrn_in_run_names: bool = Field(
        title="Privacy: MRN in run names",
        default=True,
        description="Show the patient's MRN in case run names and as an mrn: tag; off for sites "
        "that must keep it out of Prefect.",
    )
    phi_notifications: bool = Field(
        title="Privacy: patient data in notifications",
        default=False,
        description="Notifications may carry accession, MRN and patient name (mercure).",
    )

    # -- Notifications: mercure's rule notifications
    rule_notifications: dict[str, dict[str, Any]] = Field(
        title="Notifications: per rule",
        default_factory=dict,
        description=(
            "mercure's notification_* fields per rule that has a webhook or e-mail "
            "(import-config; the automations 'dicom-dispatch: rule ...' send them)."
        ),
    )

    # -- Retention: the cleaner of success/
    cleaner_enabled: bool = Field(
        title="Retention: cleaner on",
        default=False,
        description="Remove old cases from success/ (off: mercure's own cleaner may run).",
    )
    retention: float = Field(
        title="Retention: seconds in success/",
        default=259200,
        ge=0,
        description="Seconds a case stays in success/ before the off-peak clean removes it.",
    )
    emergency_clean_percentage: float = Field(
        title="Retention: emergency clean above",
        default=90,
        gt=0,
        le=100,
        description="Disk use (%) of success/'s volume above which the oldest cases go at once.",
    )
    cleaner_scan_interval: float = Field(
        title="Retention: cleaner interval",
        default=60,
        gt=0,
        description="Seconds between the cleaner's looks at success/.",
    )

    # -- Retrieve: query/retrieve
    retrieve_limit: int = Field(
        title="Retrieve: retrievals at once",
        default=2,
        ge=0,
        description="At most this many retrievals at once across all hosts (0: no limit).",
    )
    retrieve_max_instance_bytes: int = Field(
        title="Retrieve: largest object",
        default=DEFAULT_MAX_INSTANCE_BYTES,
        gt=0,
        description="A retrieved object larger than this is refused (the retrieve fails).",
    )
    retrieve_free_space_reserve_bytes: int = Field(
        title="Retrieve: free space kept",
        default=DEFAULT_FREE_SPACE_RESERVE_BYTES,
        ge=0,
        description="A retrieve stops before the free space of its destination's file system "
        "falls under this.",
    )

    # -- Background jobs: the background executor
    jobs_poll_seconds: float = Field(
        title="Background jobs: poll interval",
        default=0.5,
        ge=0.05,
        description="Seconds between the background executor's looks at waiting jobs.",
    )
    jobs_lease_seconds: float = Field(
        title="Background jobs: slot lease",
        default=60,
        ge=60,
        description="Lease of a running job's slots; a dead host's slots come back after it.",
    )
    jobs_max_processes: int = Field(
        title="Background jobs: processes per host",
        default=16,
        ge=1,
        description="At most this many job processes per executor (host).",
    )
    jobs_modules: list[str] = Field(
        title="Background jobs: job modules (deprecated)",
        default_factory=list,
        description="Deprecated and ignored (kept so older documents load): background jobs run "
        "only functions registered on the executor's host, in DICOM_DISPATCH_JOBS or the "
        "entry-point group dicom_dispatch.jobs.",
    )

    def with_overrides(self) -> DispatcherSettings:
        """A copy with the deprecated environment overrides applied (see ``blocks.host``).

        Only the services that use these values call it, and never before saving: an
        override must not be written back into the block.
        """
        update: dict[str, float] = {}
        for field in DEPRECATED_OVERRIDES:
            current = getattr(self, field)
            value = deprecated_override(field, current)
            if value != current:
                update[field] = int(value) if isinstance(current, int) else value
        return self.model_copy(update=update) if update else self

    def offpeak(self) -> OffPeak:
        """The ``Priorities`` group's window."""
        return OffPeak(self.offpeak_start, self.offpeak_end)

    def send_limits(self) -> SendLimits:
        """The ``Limits`` group."""
        return SendLimits(self.num_proc, dict(self.type_limits))

    def cleaning(self) -> Cleaning:
        """The ``Retention`` group."""
        return Cleaning(
            enabled=self.cleaner_enabled,
            retention=self.retention,
            emergency_percentage=self.emergency_clean_percentage,
            scan_interval=self.cleaner_scan_interval,
        )

    @classmethod
    def field_groups(cls) -> dict[str, list[str]]:
        """Group → its fields, in the order the UI shows them (from the titles)."""
        groups: dict[str, list[str]] = {}
        for name, info in cls.model_fields.items():
            group = (info.title or "").partition(": ")[0]
            groups.setdefault(group, []).append(name)
        return groups

    def receive_limits(self) -> ReceiveLimits:
        """What one retrieve may cost its destination (``blocks._receiver``)."""
        return ReceiveLimits(
            max_instance_bytes=self.retrieve_max_instance_bytes,
            free_space_reserve_bytes=self.retrieve_free_space_reserve_bytes,
        )

    def folders(self) -> tuple[Path, Path, Path]:
        """(outgoing, success, error), defaults under the data directory."""
        base = data_dir()
        return (
            Path(self.outgoing_folder or base / "outgoing"),
            Path(self.success_folder or base / "success"),
            Path(self.error_folder or base / "error"),
        )

    def checked_folders(self) -> tuple[Path, Path, Path]:
        """:meth:`folders`, or ``ConfigError`` if they could hurt each other
        (:func:`check_folder_layout`)."""
        folders = self.folders()
        check_folder_layout(*folders)
        return folders


def check_folder_layout(outgoing: Path, success: Path, error: Path) -> None:
    """``ConfigError`` (one line) unless outgoing, success and error are three distinct folders,
    none inside another, after resolving links: the cleaner empties success/ and the scan takes
    every folder in outgoing/ for a case, so a folder nested in another would be cleaned or
    dispatched as a case."""
    named = {
        "outgoing_folder": outgoing.resolve(),
        "success_folder": success.resolve(),
        "error_folder": error.resolve(),
    }
    for (name, path), (other, other_path) in permutations(named.items(), 2):
        if path == other_path:
            raise ConfigError(f"{name} and {other} are the same folder ({path}); use three")
        if path.is_relative_to(other_path):
            raise ConfigError(
                f"{name} ({path}) is inside {other} ({other_path}); the three folders must "
                "not be nested"
            )
