"""The example record shared by generate and curate (docs/ARTIFACTS.md), and its JSONL files.

One place builds records, so every producer (log replay, the teacher, noise) writes the same
keys and ids the same way: the id is a hash of the canonical input and messages, so the same
example gets the same id whoever produced it.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

SOURCES = ("log", "teacher", "augment")
# The cohorts of teacher-written out-of-scope probes: near the spec's domain and far from it.
# Curate holds them out of training: they validate and test the out-of-scope detector.
OUT_OF_SCOPE_NEAR, OUT_OF_SCOPE_FAR = "out_of_scope_near", "out_of_scope_far"
PROBE_COHORTS = (OUT_OF_SCOPE_NEAR, OUT_OF_SCOPE_FAR)


def canonical(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def example_id(input: Any, messages: list | None = None) -> str:
    return hashlib.sha256(canonical([input, messages]).encode()).hexdigest()[:16]


def example(*, input: Any, target: Any, cohort: str, source: str, provenance: dict,
            messages: list | None = None, soft: dict | None = None, gold: Any = None) -> dict:
    assert source in SOURCES, source
    return {"id": example_id(input, messages), "input": input, "target": target,
            "messages": messages, "soft": soft, "gold": gold, "cohort": cohort,
            "source": source, "provenance": provenance}


def with_content(record: dict, **changes: Any) -> dict:
    """A copy with new content fields and the id recomputed from them."""
    out = {**record, **changes}
    out["id"] = example_id(out["input"], out["messages"])
    return out


def message_field(input_schema: dict) -> str | None:
    """The input property a generated or logged message is written into: the single string
    field (the first required one when there are several), or None when the schema has none.
    What a student reads back from an input is runtime.format.text_field_of's rule."""
    props = input_schema.get("properties") or {}
    strings = [k for k, v in props.items() if isinstance(v, dict) and v.get("type") == "string"]
    required = [k for k in input_schema.get("required", ()) if k in strings]
    return (required or strings or [None])[0]


def message_text(record: dict, field: str | None) -> str | None:
    """The text a record's input holds under `field` (message_field's), or None."""
    value = record.get("input")
    text = value.get(field) if isinstance(value, dict) and field else None
    return text if isinstance(text, str) else None


def write_jsonl(path: Path, records: Iterable[dict]) -> int:
    n = 0
    with open(path, "w", encoding="utf-8") as f:
        for record in records:
            f.write(canonical(record) + "\n")
            n += 1
    return n


def read_jsonl(path: Path) -> Iterator[dict]:
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.strip():
                yield json.loads(line)
