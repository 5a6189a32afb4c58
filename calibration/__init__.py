"""Calibration: readers that yield feed dicts, streaming collectors, and the instrumented session."""
