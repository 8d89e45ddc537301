"""mercure's example task.json (reference/mercure-dispatcher.md §2.7), for the unit tests."""

from __future__ import annotations

from typing import Any

CASE_ID = "6f1c2a3e-f6e1-11ef-9a3b-0242ac120002"
SERIES_UID = "1.2.826.0.1.3680043.8.498.11223344556677"

# reference/mercure-dispatcher.md §2.7: a dispatch-only series task as mercure's router writes it.
MERCURE_TASK: dict[str, Any] = {
    "info": {
        "action": "route",
        "uid": SERIES_UID,
        "uid_type": "series",
        "triggered_rules": {"ct_to_pacs": True},
        "applied_rule": "",
        "patient_name": "DOE^JOHN",
        "mrn": "123456",
        "acc": "ACC20250301",
        "sender_address": "10.0.0.17",
        "mercure_version": "0.4.1",
        "mercure_appliance": "master",
        "mercure_server": "mercure-01",
        "device_serial_number": None,
        "fail_stage": None,
        "sender_aet": "CT_SCANNER_1",
        "receiver_aet": "MERCURE",
    },
    "id": CASE_ID,
    "dispatch": {
        "target_name": ["pacs"],
        "status": {"pacs": {"state": "waiting", "time": "2025-03-01 10:00:00"}},
        "retries": None,
        "next_retry_at": None,
        "series_uid": None,
    },
    "process": {},
    "study": {},
    "nomad_info": None,
}
