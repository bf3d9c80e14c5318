"""Answers in the shapes of OpenAI's chat completions API: one `chat.completion` object, or for
`stream: true` the same answer as `chat.completion.chunk` server-sent events.

The route is decided on the whole answer (the cascade reads the confidence of every emitted
token), so a stream starts once the answer is known: the student decodes a turn in tens of
milliseconds, and a client sees the deltas it would see from OpenAI (role, content or tool-call
name then arguments, a final chunk with the finish reason, `data: [DONE]`).
"""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass, field

ZERO_USAGE = {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0}
ARGUMENT_PIECE = 16  # characters of a call's arguments per streamed delta


@dataclass
class Reply:
    """A completion's answer and how it was reached."""

    message: dict                 # role, content, and tool_calls with ids when it calls tools
    info: dict                    # the `distill` field: route, reason, confidence, ...
    usage: dict = field(default_factory=lambda: dict(ZERO_USAGE))
    finish_reason: str = "stop"

    @property
    def route(self) -> str:
        return self.info["route"]


def call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


def with_call_ids(message: dict) -> dict:
    """The message with an id on every tool call (the student's calls come without)."""
    calls = message.get("tool_calls")
    if not calls:
        return {"role": "assistant", "content": message.get("content")}
    return {"role": "assistant", "content": message.get("content"),
            "tool_calls": [{"id": c.get("id") or call_id(), "type": "function",
                            "function": {"name": c["function"]["name"],
                                         "arguments": c["function"]["arguments"]}}
                           for c in calls]}


def completion(reply: Reply, model: str) -> dict:
    return {"id": f"chatcmpl-{uuid.uuid4().hex[:24]}", "object": "chat.completion",
            "created": int(time.time()), "model": model,
            "choices": [{"index": 0, "message": reply.message, "logprobs": None,
                         "finish_reason": reply.finish_reason}],
            "usage": reply.usage, "distill": reply.info}


def chunks(reply: Reply, model: str, include_usage: bool = False) -> list[dict]:
    """The answer as the chunk objects OpenAI streams."""
    base = {"id": f"chatcmpl-{uuid.uuid4().hex[:24]}", "object": "chat.completion.chunk",
            "created": int(time.time()), "model": model}

    def chunk(delta: dict, finish: str | None = None, **extra) -> dict:
        return {**base, "choices": [{"index": 0, "delta": delta, "logprobs": None,
                                     "finish_reason": finish}], **extra}

    message = reply.message
    out = [chunk({"role": "assistant", "content": ""})]
    if message.get("content"):
        out += [chunk({"content": piece}) for piece in _pieces(message["content"], 24)]
    for index, call in enumerate(message.get("tool_calls") or ()):
        out.append(chunk({"tool_calls": [{"index": index, "id": call["id"], "type": "function",
                                          "function": {"name": call["function"]["name"],
                                                       "arguments": ""}}]}))
        out += [chunk({"tool_calls": [{"index": index, "function": {"arguments": piece}}]})
                for piece in _pieces(call["function"]["arguments"], ARGUMENT_PIECE)]
    out.append(chunk({}, reply.finish_reason, distill=reply.info))
    if include_usage:
        out.append({**base, "choices": [], "usage": reply.usage})
    return out


def _pieces(text: str, size: int) -> list[str]:
    return [text[i:i + size] for i in range(0, len(text), size)]


def sse(events: list[dict]) -> list[bytes]:
    """Server-sent events: one `data:` line per chunk, then `data: [DONE]`."""
    lines = [f"data: {json.dumps(e, ensure_ascii=False, separators=(',', ':'))}\n\n".encode()
             for e in events]
    return lines + [b"data: [DONE]\n\n"]
