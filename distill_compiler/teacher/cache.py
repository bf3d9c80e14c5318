"""The per-request teacher cache: one sqlite row per completed request, committed at once.

It lives at `<cache root>/teacher.sqlite`, outside any stage artifact, so a generate stage
that fails or is interrupted still leaves every answer it paid for. WAL mode with
synchronous=NORMAL makes each commit durable against a crash or kill of this process (only
a power loss can drop the last commits) and lets a second reader look while a build writes.

A key is the hash of everything that decides an answer: model, api_base, messages, sampling
parameters, response format, tools and the sample index. The API key is never part of it,
and nothing here stores it.
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
import time
from pathlib import Path
from typing import Any

FILENAME = "teacher.sqlite"


def request_key(model: str, api_base: str | None, messages: list, params: dict,
                sample: int) -> str:
    payload = {"model": model, "api_base": api_base, "messages": messages, "params": params,
               "sample": sample}
    canonical = json.dumps(payload, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(canonical.encode()).hexdigest()


class RequestCache:
    def __init__(self, path: Path):
        path.parent.mkdir(parents=True, exist_ok=True)
        # Autocommit (isolation_level=None): each put is its own transaction, committed
        # before put() returns.
        self._db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.execute(
            "CREATE TABLE IF NOT EXISTS responses (key TEXT PRIMARY KEY, model TEXT NOT NULL,"
            " reply TEXT NOT NULL, cost_usd REAL NOT NULL, created REAL NOT NULL)")

    @classmethod
    def at(cls, cache_root: Path) -> "RequestCache":
        return cls(Path(cache_root) / FILENAME)

    def get(self, key: str) -> dict[str, Any] | None:
        row = self._db.execute("SELECT reply FROM responses WHERE key = ?", (key,)).fetchone()
        return json.loads(row[0]) if row else None

    def put(self, key: str, model: str, reply: dict[str, Any]) -> None:
        self._db.execute(
            "INSERT OR REPLACE INTO responses (key, model, reply, cost_usd, created)"
            " VALUES (?, ?, ?, ?, ?)",
            (key, model, json.dumps(reply, sort_keys=True), reply.get("cost_usd", 0.0), time.time()))

    def __len__(self) -> int:
        return self._db.execute("SELECT COUNT(*) FROM responses").fetchone()[0]

    def close(self) -> None:
        self._db.close()
