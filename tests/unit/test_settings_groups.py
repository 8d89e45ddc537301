"""``DispatcherSettings`` stays flat for scripts and the UI, but is grouped for people."""

from __future__ import annotations

from blocks.settings import Cleaning, DispatcherSettings, OffPeak, SendLimits

#: Every field users' scripts and saved documents may name: none renamed, none nested.
FLAT_FIELDS = {
    "outgoing_folder", "success_folder", "error_folder", "retry_max", "retry_delay",
    "dispatcher_scan_interval", "offpeak_start", "offpeak_end", "rule_priorities",
    "rule_notifications", "phi_notifications", "num_proc", "type_limits", "quick_retry_delays",
    "invalid_grace_seconds", "retrieve_limit", "retrieve_max_instance_bytes",
    "retrieve_free_space_reserve_bytes", "jobs_poll_seconds", "jobs_lease_seconds",
    "jobs_max_processes", "shutdown_grace_seconds", "mrn_in_run_names", "jobs_modules",
    "case_links_inside", "cleaner_enabled", "retention", "emergency_clean_percentage",
    "cleaner_scan_interval", "takeover_window_seconds",
}  # fmt: skip


def test_the_fields_stay_flat() -> None:
    assert set(DispatcherSettings.model_fields) >= FLAT_FIELDS
    schema = DispatcherSettings.model_json_schema()
    assert all("$ref" not in prop for prop in schema["properties"].values())


def test_every_field_is_titled_with_its_group_and_the_ui_shows_groups_together() -> None:
    groups = DispatcherSettings.field_groups()
    assert "" not in groups, groups.get("")  # a field without "Group: ..." title
    assert list(groups)[:2] == ["Folders", "Dispatching"]
    # The UI lays fields out in the schema's property order: one group after the other.
    # Prefect's UI sorts them by the "position" it injects from the field order.
    props = DispatcherSettings.model_json_schema()["properties"]
    shown = sorted(props, key=lambda name: props[name]["position"])
    assert shown == [name for fields in groups.values() for name in fields]
    titles = [info.title for info in DispatcherSettings.model_fields.values()]
    assert len(set(titles)) == len(titles)


def test_the_code_reads_a_group_through_its_view() -> None:
    settings = DispatcherSettings(
        offpeak_start="20:00",
        offpeak_end="05:00",
        num_proc=3,
        type_limits={"dicom": 2},
        cleaner_enabled=True,
        retention=60,
        emergency_clean_percentage=80,
        cleaner_scan_interval=5,
    )
    assert settings.offpeak() == OffPeak("20:00", "05:00")
    assert settings.send_limits() == SendLimits(3, {"dicom": 2})
    assert settings.cleaning() == Cleaning(
        enabled=True, retention=60, emergency_percentage=80, scan_interval=5
    )


def test_descriptions_survive_the_ui() -> None:
    # The UI renders descriptions as Markdown: "<data dir>" was taken for an HTML tag and vanished.
    for name, info in DispatcherSettings.model_fields.items():
        assert "<" not in (info.description or ""), name
