"""The support-agent example's spec and recorded log, checked without training anything: the
spec loads and every tool schema is enforceable, every log line replays into a trace that
curate keeps, every call renders and parses back the way the constrained runtime emits it, and
the log is varied enough to teach an agent (openings, tools, depths, clarifications, refusals)."""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path

import jsonschema
import pytest

from distill_compiler.runtime.chat_format import ChatFormat
from distill_compiler.runtime.constrained import check_schema
from distill_compiler.spec.load import load_spec
from distill_compiler.stages.curate import Validator
from distill_compiler.students.causal import data as causal_data
from distill_compiler.teacher.logs import LogReader

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "support-agent"
ORDER_ID = re.compile(r"^HB-\d{5}$")


@pytest.fixture(scope="module")
def spec():
    return load_spec(EXAMPLE / "spec.yaml")


@pytest.fixture(scope="module")
def lines():
    return [json.loads(text) for text in
            (EXAMPLE / "data" / "teacher_log.jsonl").read_text(encoding="utf-8").splitlines()
            if text.strip()]


@pytest.fixture(scope="module")
def records(spec):
    return LogReader(spec, EXAMPLE).replay(spec.teacher.logs)


def assistant_turns(record):
    return [m for m in record["messages"] if m["role"] == "assistant"]


def calls(record):
    return [c["function"] for m in assistant_turns(record) for c in m.get("tool_calls") or ()]


def test_spec_is_an_offline_agent_with_enforceable_tools(spec):
    assert spec.task == "agent" and spec.teacher.model is None
    assert spec.student.base == "smollm2-135m" and spec.student.method == "sft"
    assert 3 <= len(spec.tools) <= 4
    assert {t.name: check_schema(t.parameters) for t in spec.tools} == {
        t.name: [] for t in spec.tools}


def test_every_line_is_a_logged_request_and_response(lines, spec):
    names = {t.name for t in spec.tools}
    assert 150 <= len(lines) <= 250
    for line in lines:
        assert {t["function"]["name"] for t in line["request"]["tools"]} == names
        assert line["response"]["choices"][0]["message"]["role"] == "assistant"


def test_every_call_names_a_spec_tool_with_valid_arguments(records, spec):
    params = {t.name: t.parameters for t in spec.tools}
    for record in records:
        for call in calls(record):
            arguments = json.loads(call["arguments"])
            jsonschema.validate(arguments, params[call["name"]])
            assert ORDER_ID.match(arguments["order_id"]), arguments


def test_curate_keeps_every_trace(records, spec):
    validator = Validator(spec)
    assert [(r["provenance"]["log"], validator.problem(r)) for r in records
            if validator.problem(r)] == []


def test_calls_render_and_parse_back_as_the_runtime_emits_them(records, spec):
    chat = ChatFormat()
    for record in records:
        for point in causal_data.points(record, spec, chat):
            parsed = chat.parse(chat.assistant_body(point.target) + chat.end)
            assert parsed.get("tool_calls", []) == point.target.get("tool_calls", [])


def test_refusals_use_the_spec_response_word_for_word(records, spec):
    response = spec.refusals[0].response
    refusing = [m["content"] for r in records for m in assistant_turns(r)
                if (m.get("content") or "").startswith("I can't give legal advice")]
    assert len(refusing) >= 8 and set(refusing) == {response}


def test_the_log_is_varied(records, spec):
    openings = {r["messages"][0]["content"].strip().lower() for r in records}
    depths = Counter(len(assistant_turns(r)) for r in records)
    tools = Counter(c["name"] for r in records for c in calls(r))
    without_tools = sum(not calls(r) for r in records)
    clarified = sum(1 for r in records
                    if assistant_turns(r)[0].get("content") and calls(r))  # asks, then calls
    assert len(openings) == len(records)
    assert all(depths[d] >= 10 for d in (1, 2, 3, 4))
    assert all(tools[t.name] >= 20 for t in spec.tools)
    assert 0.1 <= without_tools / len(records) <= 0.4
    assert clarified >= 20
