"""In a log (stderr not a terminal) long loops print a plain line now and then; short ones print nothing."""

from __future__ import annotations

import pytest

from onnxq import progress as progress_module
from onnxq.progress import progress


def test_short_loops_stay_silent_in_a_log(capsys: pytest.CaptureFixture[str]) -> None:
    with progress(True, "calibrating (minmax)", 4) as advance:
        for _ in range(4):
            advance(1)
    assert capsys.readouterr().err == ""


def test_long_loops_log_lines_and_an_end(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr(progress_module, "LOG_AFTER_S", 0.0)
    monkeypatch.setattr(progress_module, "LOG_EVERY_S", 0.0)
    with progress(True, "adaround", 3) as advance:
        for _ in range(3):
            advance(1)
    lines = capsys.readouterr().err.splitlines()
    assert lines[0].startswith("onnxq: adaround: 1/3 in")
    assert lines[-1].startswith("onnxq: adaround: 3/3 in") and lines[-1].endswith("(done)")
