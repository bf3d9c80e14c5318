"""Offline scoring: `distill run BUNDLE --batch requests.jsonl` answers one request per line,
for every task type, and writes one JSON line per request, in order.

Each output line is the runtime's answer (`output`, `confidence`, `route`, `reason`, ...) with
the input's line number, or `{"line": n, "error": "..."}` for a line that is not a valid
request: one bad line does not stop the file, and the command exits 1 when any failed. The
route is what the bundle's policy decides; nothing is sent to the teacher offline.
"""

from __future__ import annotations

import json
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from ..runtime.format import InputError
from ..runtime.inputs import parse_json

CHUNK = 32  # requests per predict_batch call: a classifier encodes them together


@dataclass
class BatchStats:
    answered: int = 0
    errors: int = 0
    seconds: float = 0.0
    routes: Counter = field(default_factory=Counter)
    output: str = "stdout"

    def summary(self) -> str:
        rate = self.answered / self.seconds if self.seconds > 0 else 0.0
        routes = ", ".join(f"{r} {n}" for r, n in sorted(self.routes.items())) or "none"
        return (f"answered {self.answered} requests in {self.seconds:.1f}s ({rate:.1f}/s; "
                f"routes: {routes}); {self.errors} invalid lines; answers in {self.output}")


def read_requests(path: str) -> list[tuple[int, dict | str]]:
    """(line number, request or the reason it is not one) for each non-blank line."""
    # Bytes, split per line: a line that is not UTF-8 or not JSON is that line's error.
    data = sys.stdin.buffer.read() if path == "-" else Path(path).read_bytes()
    out: list[tuple[int, dict | str]] = []
    for number, line in enumerate(data.splitlines(), 1):
        if not line.strip():
            continue
        try:
            value = parse_json(line, f"line {number}")
        except InputError as exc:
            out.append((number, exc.message))  # the row names the line already
            continue
        out.append((number, value if isinstance(value, dict) else "not a JSON object"))
    return out


def score_file(bundle, path: str, output: str | None, reporter) -> BatchStats:
    requests = read_requests(path)
    stats = BatchStats(output=output or "stdout")
    advance = reporter.progress("scoring", len(requests))
    sink = open(output, "w", encoding="utf-8") if output else sys.stdout
    started = time.perf_counter()
    try:
        for at in range(0, len(requests), CHUNK):
            chunk = requests[at:at + CHUNK]
            for row in score_chunk(bundle, chunk, stats):
                sink.write(json.dumps(row, ensure_ascii=False) + "\n")
            sink.flush()
            advance(len(chunk))
    finally:
        if output:
            sink.close()
        reporter.close()
    stats.seconds = time.perf_counter() - started
    return stats


def score_chunk(bundle, chunk: list[tuple[int, dict | str]], stats: BatchStats) -> list[dict]:
    """Answers for one chunk, in order: invalid requests get an error line, the rest one
    predict_batch call."""
    rows: dict[int, dict] = {}
    valid: list[tuple[int, dict]] = []
    for number, request in chunk:
        if isinstance(request, str):
            rows[number] = {"line": number, "error": request}
            continue
        try:
            bundle.policy.check_input(request)
        except InputError as exc:
            rows[number] = {"line": number, "error": str(exc)}
            continue
        valid.append((number, request))
    answers = bundle.predict_batch([r for _, r in valid]) if valid else []
    for (number, _), answer in zip(valid, answers):
        rows[number] = {"line": number, **answer}
        stats.routes[answer["route"]] += 1
    stats.answered += len(valid)
    stats.errors += len(chunk) - len(valid)
    return [rows[number] for number, _ in chunk]
