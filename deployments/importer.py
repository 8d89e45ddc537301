"""``import-config``: a real mercure.json → target blocks and ``DispatcherSettings``.

Targets keep mercure's names (stored under their slug, the original name in ``target_name``) and
field names, so the import is one to one. A target type this version cannot send to yet is
reported and skipped; two names that would share a block document name are refused. Rules with
a webhook or e-mail become notification blocks and automations (``deployments.rule_automations``);
those are the only things an import deletes (a rule's, when it is gone from mercure.json).
"""

from __future__ import annotations

import json
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from blocks.base import target_slug
from blocks.errors import ConfigError
from blocks.host import JOBS_ENV
from blocks.registry import NOT_YET_SUPPORTED, TARGET_TYPES, aload_settings, aremove_other_types
from blocks.settings import DEFAULT_SETTINGS_NAME, DispatcherSettings
from deployments.rule_automations import sync_rule_notifications
from flows.background.registered import ENTRY_POINT_GROUP
from tasks.notification_payload import RuleNotification

__all__ = ["ImportReport", "cleaning_summary", "import_mercure_config", "infer_target_type"]

FOLDER_KEYS = ("outgoing_folder", "success_folder", "error_folder")
SETTINGS_KEYS = (
    "outgoing_folder",
    "success_folder",
    "error_folder",
    "retry_max",
    "retry_delay",
    "dispatcher_scan_interval",
    "offpeak_start",
    "offpeak_end",
    "retention",
    "emergency_clean_percentage",
    "cleaner_scan_interval",
)


@dataclass
class ImportReport:
    imported: dict[str, str] = field(default_factory=dict)  # name -> target type
    skipped: dict[str, str] = field(default_factory=dict)  # name -> why
    ignored_fields: dict[str, list[str]] = field(default_factory=dict)
    settings: dict[str, Any] = field(default_factory=dict)
    notifications: dict[str, list[str]] = field(default_factory=dict)  # rule -> automations
    warnings: dict[str, list[str]] = field(default_factory=dict)  # name -> what will now fail
    cleaning: dict[str, Any] = field(default_factory=dict)  # see cleaning_summary()

    def as_dict(self) -> dict[str, Any]:
        return {
            "imported": self.imported,
            "skipped": self.skipped,
            "ignored_fields": self.ignored_fields,
            "settings": self.settings,
            "notifications": self.notifications,
            "warnings": self.warnings,
            "cleaning": self.cleaning,
        }


def cleaning_summary(settings: DispatcherSettings) -> dict[str, Any]:
    """Whether our cleaner is on, and what it does, in a sentence a person reads after import.

    The import never switches it on: mercure's cleaner may still be running on the same folders.
    """
    cleaning, offpeak = settings.cleaning(), settings.offpeak()
    if cleaning.enabled:
        text = (
            f"on: success/ cases older than {cleaning.retention:g} s are removed between "
            f"{offpeak.start} and {offpeak.end}; the oldest at any time when "
            f"the volume is over {cleaning.emergency_percentage:g} % full"
        )
    else:
        text = (
            "off: nothing is removed from success/ (mercure's cleaner may keep doing it); "
            "set cleaner_enabled in DispatcherSettings to switch it on"
        )
    return {
        "enabled": cleaning.enabled,
        "retention": cleaning.retention,
        "emergency_clean_percentage": cleaning.emergency_percentage,
        "summary": text,
    }


def infer_target_type(spec: dict[str, Any]) -> str | None:
    """mercure accepts a target without ``target_type`` when its fields fit a type."""
    if spec.get("target_type"):
        return str(spec["target_type"])
    if {"ip", "port", "aet_target"} <= spec.keys():
        return "dicom"
    if {"folder", "user", "host"} <= spec.keys():
        return "sftp"
    if "folder" in spec:
        return "folder"
    return None


def read_mercure_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such file") from None
    except ValueError as exc:
        raise ConfigError(f"{path}: not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: must hold a JSON object")
    return data


def _check_slugs(names: list[str], what: str = "target") -> None:
    by_slug: dict[str, list[str]] = defaultdict(list)
    for name in names:
        by_slug[target_slug(name)].append(name)
    clashes = {slug: group for slug, group in by_slug.items() if len(group) > 1}
    if clashes:
        text = "; ".join(f"{', '.join(g)} -> {s}" for s, g in clashes.items())
        raise ConfigError(f"{what} names that would share a block name: {text}; rename one")


def notification_rules(rules: dict[str, Any]) -> list[RuleNotification]:
    """The rules that announce something (a webhook URL or e-mail addresses)."""
    found = [
        RuleNotification.from_mercure(name, spec)
        for name, spec in rules.items()
        if isinstance(spec, dict)
    ]
    announcing = [rule for rule in found if rule.announces]
    _check_slugs([rule.rule for rule in announcing], "rule")
    return announcing


async def check_folders(data: dict[str, Any]) -> None:
    """``ConfigError`` if the folders the import would leave could hurt each other."""
    current = await aload_settings()
    update = {key: data[key] for key in FOLDER_KEYS if data.get(key) not in (None, "")}
    current.model_copy(update=update).checked_folders()


def ignored_job_modules(data: dict[str, Any], report: ImportReport) -> None:
    """A ``jobs_modules`` key (ours, deprecated) is ignored with one warning: which functions
    background jobs run is the hosts' configuration, never the imported settings."""
    if "jobs_modules" in data:
        report.warnings["jobs_modules"] = [
            "ignored (deprecated): register job functions in "
            f"{JOBS_ENV} or the entry-point group {ENTRY_POINT_GROUP!r} on each host"
        ]


async def import_mercure_config(path: Path) -> ImportReport:
    """Create or update blocks and rule automations from ``path``."""
    data = read_mercure_json(path)
    targets = data.get("targets") or {}
    if not isinstance(targets, dict):
        raise ConfigError(f"{path}: 'targets' must be an object")
    _check_slugs(list(targets))
    rules = data.get("rules") or {}
    announcing = notification_rules(rules) if isinstance(rules, dict) else []
    await check_folders(data)  # a bad layout is refused before anything changes
    report = ImportReport()
    ignored_job_modules(data, report)
    for name, spec in targets.items():
        if not isinstance(spec, dict):
            report.skipped[name] = "not an object"
            continue
        kind = infer_target_type(spec)
        cls = TARGET_TYPES.get(kind or "")
        if cls is None:
            report.skipped[name] = (
                f"target type {kind!r} is not supported by this version yet"
                if kind in NOT_YET_SUPPORTED
                else f"unknown target type {kind!r}"
            )
            continue
        fields = {k: v for k, v in spec.items() if k in cls.model_fields and v is not None}
        ignored = sorted(k for k in spec if k not in cls.model_fields and k != "target_type")
        if ignored:
            report.ignored_fields[name] = ignored
        try:
            block = cls(**{**fields, "target_name": name})
        except ValidationError as exc:
            first = exc.errors()[0]
            report.skipped[name] = (
                f"invalid field {'.'.join(map(str, first['loc']))}: {first['msg']}"
            )
            continue
        await aremove_other_types(target_slug(name), cls)
        await block.save(target_slug(name), overwrite=True)
        report.imported[name] = cls.target_type
        if block.import_warnings():
            report.warnings[name] = block.import_warnings()

    settings = await aload_settings()
    for key in SETTINGS_KEYS:
        if data.get(key) not in (None, ""):
            setattr(settings, key, data[key])
    if isinstance(rules, dict):
        settings.rule_priorities = {
            rule: spec.get("priority", "normal")
            for rule, spec in rules.items()
            if isinstance(spec, dict)
            and spec.get("priority", "normal") in ("normal", "urgent", "offpeak")
        }
    settings.rule_notifications = {rule.rule: rule.as_mercure() for rule in announcing}
    settings.phi_notifications = bool(data.get("phi_notifications", False))
    await settings.save(DEFAULT_SETTINGS_NAME, overwrite=True)
    sender = data.get("email_notification_from")
    report.notifications = await sync_rule_notifications(
        announcing, str(sender) if sender else None
    )
    report.settings = settings.model_dump(mode="json", exclude={"block_type_slug"})
    report.cleaning = cleaning_summary(settings)
    return report
