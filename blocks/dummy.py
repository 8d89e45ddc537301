"""mercure's Dummy target: accepts every case and sends nothing (for rules and tests)."""

from __future__ import annotations

from typing import Any, ClassVar

from blocks.base import DispatchTarget, SendContext, SendResult, dicom_files

__all__ = ["DummyTarget"]


class DummyTarget(DispatchTarget):
    """A target that always succeeds without sending anything."""

    _block_type_name = "Dummy Target"
    _block_type_slug = "dummy-target"
    _description = "mercure's Dummy target: every send succeeds, nothing is sent."
    target_type: ClassVar[str] = "dummy"
    _example_document = "dummy"
    _example_probes = False

    def send(self, context: SendContext) -> SendResult:
        files = dicom_files(context.case_dir)
        return SendResult(files=len(files), detail="dummy target: nothing sent")

    def test_connection(self) -> dict[str, Any]:
        return {}
