"""Replay recorded teacher traffic (`teacher.logs`) as examples, with no live teacher.

Accepted files, one record per line or row:
- JSONL chat logs in OpenAI format: `{"messages": [...], "response": {assistant message},
  "logprobs": optional}`, or the request/response shape `{"request": {"messages": [...]},
  "response": {"choices": [{"message": ..., "logprobs": ...}]}}`;
- JSONL rows `{"input": str | object, "label": ...}` (classify) or `{"input", "output"}` (extract);
- CSV with a header naming the input column (input | text | message) and, for classify, the
  label column (label | category | intent), as in banking77's `text,category`.

A string input goes into the input schema's single string property. A row's label is mapped
onto an intent when the intent lists it in `log_labels` (exactly as written), else when it
matches a label name up to case and punctuation. A row label that matches nothing stops the
stage with every such label, its row count and a did-you-mean, rather than losing those rows:
the fix is a `log_labels:` entry or an intent. (A chat log's answer is the teacher's text; one
that names no label is kept as written and counted by curate.)

`teacher.pool` files are read here too (`LogReader.pool`): the same formats with any answer
ignored, plus `.txt` with one request per line; only the request's text is kept.
"""

from __future__ import annotations

import csv
import difflib
import json
import re
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ..data import records
from ..errors import StageError
from ..spec.models import class_labels
from .labels import label_distribution, label_of, normalize_label

INPUT_COLUMNS = ("input", "text", "message")
LABEL_COLUMNS = ("label", "category", "intent")


class LogReader:
    def __init__(self, spec, spec_dir: Path):
        self.task = spec.task
        self.labels = class_labels(spec.intents, spec.refusals)
        self.field = records.message_field(spec.input.schema_)
        self.model = spec.teacher.model
        self.spec_dir = spec_dir
        # A log's own spelling of a label -> the intent whose `log_labels` lists it.
        self.aliases = {raw: intent.name for intent in spec.intents for raw in intent.log_labels}
        self.unmapped: Counter[str] = Counter()  # row labels that match no label: rows each

    def replay(self, logs: tuple[str, ...]) -> list[dict]:
        out: list[dict] = []
        for name in logs:
            path = self.spec_dir / name
            rows = self._csv(path, name) if path.suffix.lower() == ".csv" else self._jsonl(path, name)
            out += [self._record(row, f"{name}:{line}") for line, row in rows]
        if self.unmapped:
            raise unmapped_labels_error(self.unmapped, self.labels)
        return out

    def pool(self, files: tuple[str, ...]) -> list:
        """The requests of unlabeled traffic files (`teacher.pool`), in file order: the formats
        above with any answers ignored, or text with one request per line."""
        from ..data.active import PoolRequest

        out = []
        for name in files:
            path = self.spec_dir / name
            suffix = path.suffix.lower()
            if suffix == ".csv":
                rows = self._csv(path, name, labelled=False)
            elif suffix == ".txt":
                rows = _text_lines(path)
            else:
                rows = self._jsonl(path, name)
            for line, row in rows:
                text = _request_text(row)
                if not isinstance(text, str):
                    raise StageError("generate", f"{name}:{line}: a pool request must be text "
                                     "(an `input` string or a chat log's user message)",
                                     "log the user's message as text")
                if text.strip():
                    out.append(PoolRequest(text.strip(), f"{name}:{line}"))
        return out

    # ----------------------------------------------------------------- files -> rows

    def _csv(self, path: Path, name: str, labelled: bool = True) -> Iterator[tuple[int, dict]]:
        with open(path, newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            columns = {c.strip().lower(): c for c in reader.fieldnames or ()}
            text = next((columns[c] for c in INPUT_COLUMNS if c in columns), None)
            label = next((columns[c] for c in LABEL_COLUMNS if c in columns), None)
            if text is None or (labelled and self.task == "classify" and label is None):
                raise StageError("generate", f"{name}: CSV header {list(columns)} names no "
                                 f"input column ({'|'.join(INPUT_COLUMNS)}) or label column "
                                 f"({'|'.join(LABEL_COLUMNS)})", "rename the header columns")
            for line, row in enumerate(reader, start=2):
                yield line, {"input": row[text], "label": row[label] if label else None}

    def _jsonl(self, path: Path, name: str) -> Iterator[tuple[int, dict]]:
        with open(path, encoding="utf-8") as f:
            for line, text in enumerate(f, start=1):
                if not text.strip():
                    continue
                try:
                    row = json.loads(text)
                except ValueError as exc:
                    raise StageError("generate", f"{name}:{line}: not a JSON line ({exc})",
                                     "fix or remove the line") from None
                if not isinstance(row, dict) or not ({"input", "messages", "request"} & row.keys()):
                    raise StageError("generate", f"{name}:{line}: expected a chat log line "
                                     "({messages, response}) or a row ({input, label|output})",
                                     "see the teacher.logs formats in logs.py")
                yield line, row

    # ----------------------------------------------------------------- rows -> records

    def _record(self, row: dict, where: str) -> dict:
        provenance = {"request": None, "model": self.model, "cost_usd": 0.0, "log": where}
        if "input" in row:
            return self._row_record(row, where, provenance)
        request = row.get("request") or {"messages": row.get("messages")}
        response = row.get("response") or {}
        if "choices" in response:
            provenance["model"] = response.get("model", self.model)
            choice = response["choices"][0]
            message, logprobs = choice.get("message") or {}, choice.get("logprobs")
        else:
            message, logprobs = response, row.get("logprobs")
        messages = [m for m in request.get("messages") or [] if m.get("role") != "system"]
        if self.task == "agent":
            return records.example(input=_offered_tools(request), target=None,
                                   messages=messages + [_assistant(message)],
                                   cohort="log", source="log", provenance=provenance)
        user = next((m.get("content") for m in reversed(messages) if m.get("role") == "user"), None)
        if not isinstance(user, str):
            raise StageError("generate", f"{where}: a chat log line needs a user message",
                             "log the request's messages")
        content = message.get("content")
        if self.task == "extract":
            return records.example(input=self._input(user, where), target=_json_or_text(content),
                                   cohort="log", source="log", provenance=provenance)
        label = label_of(content, self.labels)
        soft = None
        tokens = _tokens(logprobs)
        if label and tokens:
            soft = label_distribution(tokens, self.labels, label)
        return records.example(input=self._input(user, where), target=label or content, soft=soft,
                               cohort="log", source="log", provenance=provenance)

    def _row_record(self, row: dict, where: str, provenance: dict) -> dict:
        target = row.get("label") if self.task == "classify" else row.get("output", row.get("target"))
        if self.task == "classify":
            target = self._label(target)
        return records.example(input=self._input(row["input"], where), target=target,
                               soft=row.get("soft"), gold=row.get("gold"), cohort="log",
                               source="log", provenance=provenance)

    def _label(self, raw: Any) -> Any:
        """A row's label as a spec label: the intent that lists it in `log_labels`, else the
        label whose name it is up to case and punctuation; counted as unmapped otherwise."""
        if not isinstance(raw, str):
            return raw  # curate refuses a row without a label
        raw = raw.strip()
        if raw in self.aliases:
            return self.aliases[raw]
        name = log_label_name(raw)
        if name in self.labels:
            return name
        self.unmapped[raw] += 1
        return raw

    def _input(self, value: Any, where: str) -> Any:
        if not isinstance(value, str):
            return value
        if self.field is None:
            raise StageError("generate", f"{where}: the input is text but input.schema has no "
                             "string property to put it in", "log inputs as objects")
        return {self.field: value}


def log_label_name(raw: str) -> str:
    """`Refund_not_showing_up` -> `refund_not_showing_up`, `reverted_card_payment?` ->
    `reverted_card_payment`: a log label as a spec name, punctuation dropped."""
    return re.sub(r"[^a-z0-9_]", "", normalize_label(raw))


def unmapped_labels_error(unmapped: Counter, labels: tuple[str, ...]) -> StageError:
    """Every log label that names no spec label, with its row count and the closest label."""
    lines = []
    for raw, rows in sorted(unmapped.items(), key=lambda kv: (-kv[1], kv[0])):
        close = difflib.get_close_matches(log_label_name(raw), labels, n=1, cutoff=0.5)
        guess = f" (did you mean '{close[0]}'?)" if close else ""
        lines.append(f"  {raw!r}: {rows} row{'s' if rows != 1 else ''}{guess}")
    shown = "\n".join(lines[:30]) + (f"\n  ... and {len(lines) - 30} more" if len(lines) > 30 else "")
    return StageError(
        "generate", f"{len(unmapped)} log label(s) in {sum(unmapped.values())} rows match no "
        f"intent:\n{shown}",
        "add each to the intent it means as `log_labels: [...]` (exactly as the log spells "
        "it), add the intent, or remove the rows")


def _text_lines(path: Path) -> Iterator[tuple[int, dict]]:
    with open(path, encoding="utf-8") as f:
        for line, text in enumerate(f, start=1):
            yield line, {"input": text}


def _request_text(row: dict):
    """The request of a pool row: its `input`, or the last user message of a chat log line."""
    if "input" in row:
        return row["input"]
    request = row.get("request") or {"messages": row.get("messages")}
    users = [m.get("content") for m in request.get("messages") or ()
             if isinstance(m, dict) and m.get("role") == "user"]
    return users[-1] if users else None


def _offered_tools(request: dict) -> dict | None:
    """The tools a logged request offered, by name: the trace is replayed with just these, as
    production saw it. None (all the spec's tools) when the log does not say."""
    names = [t.get("function", t).get("name") for t in request.get("tools") or ()
             if isinstance(t, dict)]
    return {"tools": sorted(n for n in names if isinstance(n, str))} if names else None


def _assistant(message: dict) -> dict:
    out = {"role": "assistant", "content": message.get("content")}
    if message.get("tool_calls"):
        out["tool_calls"] = [
            {**call, "function": {**call["function"], "arguments": _as_json_string(
                call["function"].get("arguments"))}} for call in message["tool_calls"]]
    return out


def _as_json_string(arguments: Any) -> str:
    return arguments if isinstance(arguments, str) else json.dumps(arguments, sort_keys=True)


def _json_or_text(content: Any) -> Any:
    if not isinstance(content, str):
        return content
    try:
        return json.loads(content)
    except ValueError:
        return content  # curate drops it under output_schema


def _tokens(logprobs: Any) -> list[dict] | None:
    """OpenAI `logprobs.content` in the shape label_distribution reads."""
    content = logprobs.get("content") if isinstance(logprobs, dict) else logprobs
    if not content:
        return None
    return [{"token": t["token"], "logprob": t["logprob"],
             "top": [[a["token"], a["logprob"]] for a in t.get("top_logprobs") or []]}
            for t in content]
