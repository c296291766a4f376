"""The training sessions of a comparison folder, for the report's header.

A comparison grown in stages (``--only``, more ``--steps``) has no single command, so every session that trains in
the folder is recorded: a line when it starts (so a session killed outright is still listed, since its checkpoints
may have advanced the runs) and a line with its outcome when it ends. Lines are short single appends, so sessions
running side by side in one folder may share the file; a session is matched to its outcome by an id.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

HISTORY_FILE = "commands.jsonl"
NO_END = "no end recorded: killed, or still running"


def _now() -> str:
    return time.strftime("%Y-%m-%d %H:%M %Z")


def _append(output: Path, entry: dict[str, Any]) -> None:
    with (output / HISTORY_FILE).open("a", encoding="utf-8") as history:
        history.write(json.dumps(entry) + "\n")


@contextlib.contextmanager
def recorded_session(output: Path, command: str) -> Iterator[None]:
    """Record ``command`` as started now, and how it ended: finished, interrupted (Ctrl-C) or failed."""
    output.mkdir(parents=True, exist_ok=True)
    session = f"{os.getpid()}-{uuid.uuid4().hex[:8]}"
    _append(output, {"session": session, "date": _now(), "command": command})
    outcome = "failed"
    try:
        yield
        outcome = "finished"
    except KeyboardInterrupt:
        outcome = "interrupted"
        raise
    except Exception as error:
        outcome = f"failed ({type(error).__name__})"
        raise
    finally:
        _append(output, {"session": session, "ended": _now(), "outcome": outcome})


def _entries(path: Path) -> list[dict[str, Any]]:
    entries = []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines() if path.is_file() else []:
        try:
            entry = json.loads(line)
        except json.JSONDecodeError:  # a line cut short by a crash: the report is still worth writing
            logger.warning("%s: skipped an unreadable line: %.60s", path, line)
            continue
        if isinstance(entry, dict):
            entries.append(entry)
    return entries


def history_lines(output: Path) -> list[str]:
    """The report's list of the folder's training sessions, oldest first; nothing when one command made it all.

    Lines without a session id come from before sessions were recorded at their start: their date is when they
    ended, and only finished sessions were written.
    """
    entries = _entries(output / HISTORY_FILE)
    ends = {e["session"]: e for e in entries if {"session", "ended", "outcome"} <= e.keys()}
    sessions = [e for e in entries if {"date", "command"} <= e.keys()]
    if len(sessions) < 2:
        return []
    count = len(sessions)
    lines = [f"- All {count} training sessions in this folder, oldest first (each trains, resumes or skips runs):"]
    for session in sessions:
        if "session" not in session:
            lines.append(f"  - {session['date']}: `{session['command']}`")
            continue
        end = ends.get(session["session"])
        how = f"{end['outcome']} {end['ended']}" if end else NO_END
        lines.append(f"  - {session['date']} ({how}): `{session['command']}`")
    return lines
