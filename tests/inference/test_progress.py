"""Progress of long loops: a log line with the time left when not on a terminal."""

from __future__ import annotations

import logging

from inference.progress import _clock, progress


def test_log_lines_with_the_time_left_when_not_on_a_terminal(caplog) -> None:
    with caplog.at_level(logging.INFO, logger="nodal.progress"):
        assert list(progress(range(5), 5, "phantoms", every_s=0.0, terminal=False)) == [0, 1, 2, 3, 4]
    lines = [r.getMessage() for r in caplog.records if r.name == "nodal.progress"]
    assert len(lines) == 5
    assert lines[-1].startswith("phantoms: 5/5, ") and lines[-1].endswith("about 0:00 left")


def test_only_the_last_line_when_the_loop_is_quicker_than_the_period(caplog) -> None:
    with caplog.at_level(logging.INFO, logger="nodal.progress"):
        list(progress(range(100), 100, "steps", every_s=3600.0, terminal=False))
    assert [r.getMessage().split(",")[0] for r in caplog.records] == ["steps: 100/100"]


def test_a_bar_on_a_terminal(capsys) -> None:
    assert list(progress(range(3), 3, "cases", terminal=True)) == [0, 1, 2]
    assert "cases" in capsys.readouterr().err


def test_clock() -> None:
    assert (_clock(5), _clock(75), _clock(3725)) == ("0:05", "1:15", "1:02:05")
