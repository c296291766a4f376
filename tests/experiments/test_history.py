"""A comparison folder's session history: every session listed with its outcome, including killed ones."""

from __future__ import annotations

import json
import time

import pytest

from switchformer.experiments.history import HISTORY_FILE, NO_END, history_lines, recorded_session

# Dates as history.py writes them (any fixed moment will do).
EARLIER = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(0))
LATER = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(3600))


def _sessions(folder) -> list[str]:
    return [line for line in history_lines(folder) if line.startswith("  - ")]


def test_each_outcome_is_listed_with_its_session(tmp_path):
    with recorded_session(tmp_path, "switchformer compare --steps 10"):
        pass
    with pytest.raises(KeyboardInterrupt), recorded_session(tmp_path, "switchformer compare --steps 20"):
        raise KeyboardInterrupt
    with pytest.raises(ValueError), recorded_session(tmp_path, "switchformer compare --steps 30"):
        raise ValueError("bad")
    # A session killed outright (SIGKILL, power loss) wrote its start line only.
    entry = {"session": "4242-deadbeef", "date": LATER, "command": "switchformer compare --steps 40"}
    with (tmp_path / HISTORY_FILE).open("a") as history:
        history.write(json.dumps(entry) + "\n")

    header, *_ = history_lines(tmp_path)
    assert header.startswith("- All 4 training sessions in this folder, oldest first")
    finished, interrupted, failed, killed = _sessions(tmp_path)
    assert "(finished " in finished and finished.endswith("`switchformer compare --steps 10`")
    assert "(interrupted " in interrupted and interrupted.endswith("--steps 20`")
    assert "(failed (ValueError) " in failed and failed.endswith("--steps 30`")
    assert killed == f"  - {LATER} ({NO_END}): `switchformer compare --steps 40`"


def test_sessions_side_by_side_are_matched_to_their_own_outcome(tmp_path):
    """Two sessions sharing a folder end in the opposite order from their start: the ids keep them apart."""
    outer = recorded_session(tmp_path, "switchformer compare --only dense-seed0")
    outer.__enter__()
    with pytest.raises(RuntimeError), recorded_session(tmp_path, "switchformer compare --only switch-8"):
        raise RuntimeError
    outer.__exit__(None, None, None)
    dense, switch = _sessions(tmp_path)
    assert "(finished " in dense and dense.endswith("--only dense-seed0`")
    assert "(failed (RuntimeError) " in switch and switch.endswith("--only switch-8`")


def test_old_lines_and_broken_lines(tmp_path, caplog):
    """Lines written before sessions had ids (at their end) keep their plain form; a torn line is skipped."""
    old = {"date": EARLIER, "command": "switchformer compare --steps 10000"}
    torn = json.dumps({"session": "1-ab", "date": LATER})[:-8]
    (tmp_path / HISTORY_FILE).write_text(json.dumps(old) + "\n" + torn + "\n")
    assert history_lines(tmp_path) == []  # one readable session: the header's command says it all
    assert "skipped an unreadable line" in caplog.text
    with recorded_session(tmp_path, "switchformer compare --steps 12000"):
        pass
    old_line, new_line = _sessions(tmp_path)
    assert old_line == f"  - {EARLIER}: `switchformer compare --steps 10000`"
    assert "(finished " in new_line


def test_no_history_no_lines(tmp_path):
    assert history_lines(tmp_path) == []
