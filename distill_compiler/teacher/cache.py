"""The per-request teacher cache: one sqlite row per completed request, committed at once.

It lives at `<cache root>/teacher.sqlite`, outside any stage artifact, so a generate stage
that fails or is interrupted still leaves every answer it paid for. WAL mode with
synchronous=NORMAL makes each commit durable against a crash or kill of this process (only
a power loss can drop the last commits) and lets a second reader look while a build writes.

Beside the answers, the open batches (teacher.batch, teacher/batch.py): a batch's id and the
request keys it holds are committed the moment the provider accepts it, before it is polled,
so a compile killed while a batch runs resumes polling that batch instead of paying again.

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
        # What open() found wrong and did about it, for the stage to report; None when fine.
        self.recovered: str | None = None
        try:
            self._db = _open(path)
        except sqlite3.DatabaseError as exc:
            # Truncated or overwritten by hand: its answers cannot be trusted (or read). Keep
            # the file for whoever wants to look, and start an empty cache beside it.
            aside = path.with_name(f"{path.name}.corrupt-{time.strftime('%Y%m%d-%H%M%S')}")
            for suffix in ("", "-wal", "-shm"):
                if Path(f"{path}{suffix}").exists():
                    Path(f"{path}{suffix}").rename(f"{aside}{suffix}")
            self.recovered = (f"the teacher cache {path} is unreadable ({exc}); moved it to "
                              f"{aside.name} and started an empty one (its answers are asked again)")
            self._db = _open(path)

    @classmethod
    def at(cls, cache_root: Path) -> RequestCache:
        return cls(Path(cache_root) / FILENAME)

    def get(self, key: str) -> dict[str, Any] | None:
        """The cached reply, or None; a row that is not a JSON object (edited by hand) is a miss."""
        row = self._db.execute("SELECT reply FROM responses WHERE key = ?", (key,)).fetchone()
        try:
            reply = json.loads(row[0]) if row else None
        except (TypeError, ValueError):
            return None
        return reply if isinstance(reply, dict) else None

    def put(self, key: str, model: str, reply: dict[str, Any]) -> None:
        self._db.execute(
            "INSERT OR REPLACE INTO responses (key, model, reply, cost_usd, created)"
            " VALUES (?, ?, ?, ?, ?)",
            (key, model, json.dumps(reply, sort_keys=True), reply.get("cost_usd", 0.0), time.time()))

    def open_batch(self, batch_id: str, endpoint: str, keys: list[str]) -> None:
        """Record a batch the provider accepted at `endpoint` (model and api_base), holding `keys`."""
        self._db.execute("INSERT OR REPLACE INTO batches (batch_id, endpoint, keys, created)"
                         " VALUES (?, ?, ?, ?)", (batch_id, endpoint, json.dumps(keys), time.time()))

    def open_batches(self, endpoint: str) -> dict[str, list[str]]:
        """The batches at `endpoint` not yet closed: batch id -> the request keys it holds."""
        rows = self._db.execute("SELECT batch_id, keys FROM batches WHERE endpoint = ?"
                                " ORDER BY created", (endpoint,)).fetchall()
        return {batch_id: json.loads(keys) for batch_id, keys in rows}

    def close_batch(self, batch_id: str) -> None:
        """Forget a batch whose answers are all cached (or that ended without any)."""
        self._db.execute("DELETE FROM batches WHERE batch_id = ?", (batch_id,))

    def __len__(self) -> int:
        return self._db.execute("SELECT COUNT(*) FROM responses").fetchone()[0]

    def close(self) -> None:
        self._db.close()


def _open(path: Path) -> sqlite3.Connection:
    """Connect, set the journal up and check the file is a sound database (quick_check reads
    every page once: milliseconds for a cache of thousands of answers)."""
    # Autocommit (isolation_level=None): each put is its own transaction, committed
    # before put() returns.
    db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    try:
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=NORMAL")
        db.execute(
            "CREATE TABLE IF NOT EXISTS responses (key TEXT PRIMARY KEY, model TEXT NOT NULL,"
            " reply TEXT NOT NULL, cost_usd REAL NOT NULL, created REAL NOT NULL)")
        db.execute(
            "CREATE TABLE IF NOT EXISTS batches (batch_id TEXT PRIMARY KEY, endpoint TEXT NOT NULL,"
            " keys TEXT NOT NULL, created REAL NOT NULL)")
        check = db.execute("PRAGMA quick_check").fetchone()[0]
        if check != "ok":
            raise sqlite3.DatabaseError(f"quick_check: {check}")
    except sqlite3.DatabaseError:
        db.close()
        raise
    return db
