"""mercure's example task.json (reference/mercure-dispatcher.md §2.7), for the unit tests.

Kept as the JSON text mercure's router writes, not retyped as a Python dict: it stands for what
mercure hands over, independently of the product's own task.json skeleton (``new_task`` in
tasks/taskjson.py), so that the product is never measured against a copy of its own code.
"""

from __future__ import annotations

import json
from typing import Any

# reference/mercure-dispatcher.md §2.7: a dispatch-only series task as mercure's router writes it.
MERCURE_TASK: dict[str, Any] = json.loads(
    """
{
  "info": {
    "action": "route",
    "uid": "1.2.826.0.1.3680043.8.498.11223344556677",
    "uid_type": "series",
    "triggered_rules": {"ct_to_pacs": true},
    "applied_rule": "",
    "patient_name": "DOE^JOHN",
    "mrn": "123456",
    "acc": "ACC20250301",
    "sender_address": "10.0.0.17",
    "mercure_version": "0.4.1",
    "mercure_appliance": "master",
    "mercure_server": "mercure-01",
    "device_serial_number": null,
    "fail_stage": null,
    "sender_aet": "CT_SCANNER_1",
    "receiver_aet": "MERCURE"
  },
  "id": "6f1c2a3e-f6e1-11ef-9a3b-0242ac120002",
  "dispatch": {
    "target_name": ["pacs"],
    "status": {"pacs": {"state": "waiting", "time": "2025-03-01 10:00:00"}},
    "retries": null,
    "next_retry_at": null,
    "series_uid": null
  },
  "process": {},
  "study": {},
  "nomad_info": null
}
"""
)
CASE_ID: str = MERCURE_TASK["id"]
SERIES_UID: str = MERCURE_TASK["info"]["uid"]
