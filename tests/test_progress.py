"""Progress of long loops where stderr is a log, not a terminal: lines with the time left."""

import pytest

from edgequant import progress

pytestmark = pytest.mark.unit


def test_a_loop_in_a_log_reports_how_far_it_is_and_the_time_left(monkeypatch, capsys):
    monkeypatch.delenv("EDGEQUANT_QUIET", raising=False)
    monkeypatch.setattr(progress, "LOG_EVERY_S", 0.0)  # a line at every item instead of every 30 s
    seen = list(progress.track(range(4), "rounding weights"))
    assert seen == [0, 1, 2, 3]
    lines = capsys.readouterr().err.splitlines()  # capsys's stderr is not a terminal
    assert len(lines) == 4
    assert lines[0].startswith("edgequant: rounding weights: 0/4 after ")
    assert lines[-1].startswith("edgequant: rounding weights: 3/4 after ") and "left" in lines[-1]


def test_the_time_left_is_the_rate_so_far_carried_forward():
    assert progress.progress_line("scoring", 12, 64, 90.0) == "scoring: 12/64 after 1m 30s, about 6m 30s left"
    assert progress.progress_line("scoring", 0, 64, 5.0) == "scoring: 0/64 after 5s"
    assert progress.progress_line("reading", 3, None, 5.0) == "reading: 3/? after 5s"


def test_quiet_loops_say_nothing(monkeypatch, capsys):
    monkeypatch.setenv("EDGEQUANT_QUIET", "1")
    monkeypatch.setattr(progress, "LOG_EVERY_S", 0.0)
    assert list(progress.track(iter("abc"), "x")) == ["a", "b", "c"]
    assert capsys.readouterr().err == ""
