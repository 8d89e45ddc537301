"""Benchmarks of dicom-dispatch beside the tools it replaces (run as ``python -m bench.<name>``)."""
