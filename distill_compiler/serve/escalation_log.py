"""The escalation log: every request the served bundle handed to the teacher, with its answer.

Lines are `teacher.logs` rows (see teacher/logs.py), so listing the file under the spec's
`teacher.logs` makes the next compile learn from the traffic the student was unsure about:
`{"input": {...}, "label": "..."}` for a classifier, `{"input": {...}, "output": {...}}` for an
extraction, and for an agent turn the chat format `{"request": {"messages", "tools"},
"response": {assistant message}}`, so the trace is replayed with the tools production offered.
An `escalation` object rides along for people reading the file (why the request escalated, what
the student said); LogReader ignores it.

AppendLog also writes the request log (--request-log), which has the same needs.

Appends are one `write(2)` of one whole line on a file opened O_APPEND, under a lock: lines
from concurrent requests (or from several server processes sharing the file) never interleave,
and nothing is buffered in the process, so a crash loses no answered request.
"""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path


class AppendLog:
    """A JSONL file that whole lines are appended to, by any thread or process."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        self._lock = threading.Lock()

    def append(self, row: dict) -> None:
        data = (json.dumps(row, ensure_ascii=False, separators=(",", ":")) + "\n").encode("utf-8")
        with self._lock:
            view = memoryview(data)
            while view:  # a regular file takes the whole line at once; loop for the odd short write
                view = view[os.write(self._fd, view):]

    def close(self) -> None:
        with self._lock:
            if self._fd >= 0:
                os.close(self._fd)
                self._fd = -1


def classify_row(input: dict, label: str, *, reason: str, student_label: str,
                 student_confidence: float, model: str) -> dict:
    """The classify `teacher.logs` row for one escalated request."""
    return {"input": input, "label": label,
            "escalation": {"reason": reason, "student_label": student_label,
                           "student_confidence": round(student_confidence, 4), "model": model}}


def extract_row(input: dict, output: dict, escalation: dict) -> dict:
    """The extract `teacher.logs` row for one escalated request."""
    return {"input": input, "output": output, "escalation": escalation}


def agent_row(messages: list[dict], tools: list[dict], response: dict, escalation: dict) -> dict:
    """The agent `teacher.logs` row (chat format) for one escalated turn: the messages as sent
    (LogReader drops system turns: the bundle's own is rendered at training), the tools
    offered in OpenAI's format, and the teacher's message."""
    return {"request": {"messages": messages, "tools": tools}, "response": response,
            "escalation": escalation}
