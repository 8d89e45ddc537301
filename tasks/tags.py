"""The tags of a send task, whose Prefect concurrency limits are the dispatcher's limits.

Prefect-free, so the limits bootstrap, the metrics and the CLI can name them without importing
the engine (architecture §4.4).
"""

from __future__ import annotations

__all__ = ["TOTAL_TAG", "is_send_tag", "send_tags", "target_tag", "type_tag"]

#: The tag every send carries; its limit is ``DispatcherSettings.num_proc``.
TOTAL_TAG = "dicom-dispatch"


_TYPE_PREFIX = "target-type:"
_TARGET_PREFIX = "target:"


def type_tag(target_type: str) -> str:
    """The tag limited by ``DispatcherSettings.type_limits[target_type]``."""
    return f"{_TYPE_PREFIX}{target_type}"


def target_tag(target_name: str) -> str:
    """The tag limited by the target block's ``max_concurrent_sends``."""
    return f"{_TARGET_PREFIX}{target_name}"


def is_send_tag(tag: str) -> bool:
    """Whether ``tag`` is one of the tags :func:`send_tags` gives (and its limit one of ours)."""
    return tag == TOTAL_TAG or tag.startswith((_TYPE_PREFIX, _TARGET_PREFIX))


def send_tags(target_name: str, target_type: str) -> list[str]:
    """The tags whose concurrency limits apply to a send."""
    return [TOTAL_TAG, type_tag(target_type), target_tag(target_name)]
