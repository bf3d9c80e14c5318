"""Curated records as conversations for a causal-LM student (tasks extract and agent).

Train, export and evaluate all read records through here, so the student is trained on, checked
on and measured on the same prompts the bundle's runtime builds: both take the system turn from
`ChatFormat.system_text` and the user turn from `user_text` (runtime/chat_format.py).

- extract: system (description + output schema), user (the input's text), assistant (the
  teacher's JSON in schema order). One prediction point per record.
- agent: system (description + the tools offered), then the trace. Every assistant turn is
  trained; every assistant turn is also a prediction point, with the conversation before it as
  the prompt and its depth (assistant turns before it) for the per-depth breakdown.

An agent record's `input` may name the tools its request offered (`{"tools": [names]}`, kept
from production logs); otherwise all the spec's tools are offered.
"""

from __future__ import annotations

from dataclasses import dataclass

from ...runtime.chat_format import ChatFormat, dumps, order_like, user_text
from ...runtime.format import text_field_of


@dataclass(frozen=True)
class Point:
    """One answer to predict: the prepared prompt messages and the teacher's answer."""

    id: str
    input: object        # the request the runtime receives for this answer
    prompt: list[dict]
    target: dict         # the teacher's assistant message (prepared: arguments as ordered JSON)
    tools: list[dict]    # tools offered at this point (agent), [] for extract
    depth: int           # assistant turns before this one
    cohort: str


def spec_tools(spec) -> list[dict]:
    return [{"name": t.name, "description": t.description, "parameters": t.parameters}
            for t in spec.tools]


def offered_tools(record: dict, tools: list[dict]) -> list[dict]:
    names = (record.get("input") or {}).get("tools") if isinstance(record.get("input"), dict) else None
    return tools if not names else [t for t in tools if t["name"] in set(names)]


def system_text(spec, chat: ChatFormat, tools: list[dict]) -> str:
    output_schema = spec.output.schema_ if spec.task == "extract" else None
    return chat.system_text(spec.description, tools, output_schema)


def conversation(record: dict, spec, chat: ChatFormat) -> list[dict]:
    """The record as prepared chat messages, system turn first."""
    if spec.task == "extract":
        answer = dumps(order_like(record["target"], spec.output.schema_))
        messages = [{"role": "user", "content": user_text(record["input"],
                                                          text_field_of(spec.input.schema_))},
                    {"role": "assistant", "content": answer}]
        return chat.prepare(messages, system_text(spec, chat, []))
    tools = offered_tools(record, spec_tools(spec))
    return chat.prepare(record["messages"], system_text(spec, chat, tools), tools)


def runtime_input(record: dict, prompt: list[dict], tools: list[dict]) -> object:
    """The request a service would send the bundle at this point (runtime.causal's input)."""
    if record.get("messages") is None:
        return record["input"]
    return {"messages": [m for m in prompt if m["role"] != "system"],
            "tools": [t["name"] for t in tools]}


def points(record: dict, spec, chat: ChatFormat) -> list[Point]:
    messages = conversation(record, spec, chat)
    tools = [] if spec.task == "extract" else offered_tools(record, spec_tools(spec))
    out, depth = [], 0
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        out.append(Point(f"{record['id']}:{depth}", runtime_input(record, messages[:i], tools),
                         messages[:i], message, tools, depth, record.get("cohort", "")))
        depth += 1
    return out
