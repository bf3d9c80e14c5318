"""Chat completions over agent and extract bundles: the decoder student behind OpenAI's API.

Agent. `messages` is the conversation (user, assistant turns with `tool_calls`, `tool`
results); `tools`, in OpenAI's function format, are the tools the host offers, each of which
must be one of the bundle's, with the same name and parameters schema (400 naming the first
that is not); none sent means all of the bundle's. `tool_choice` (`auto`, `none`, `required`,
or `{"type": "function", "function": {"name": ...}}`) is enforced by the constrained decoder.
The answer is an assistant message: `tool_calls` with ids and arguments as a JSON string
(finish_reason `tool_calls`), or content.

Extract. The last user message is the input, as for classify; the answer is the extracted JSON
as the message's content. `response_format` may be `text`, `json_object`, or a `json_schema`
whose schema equals the bundle's output schema (400 otherwise: the student was trained for its
schema and cannot answer another).

Escalations send the same messages (with the bundle's description as a system message when
there is none) to the teacher with the tools and tool_choice, or the output schema as
response_format. The teacher's answer is returned when it fits the bundle (every call to an
offered tool with valid arguments; an extraction valid for the schema); otherwise, as when the
teacher fails, the student's answer with route `student-fallback`.
"""

from __future__ import annotations

import json
from typing import Any

import jsonschema

from ..metrics import structured
from ..runtime.chat_format import dumps
from ..runtime.format import InputError
from .escalation_log import agent_row, extract_row
from .openai_format import Reply, with_call_ids
from .request import ApiError, bundle_input, content_text, messages_of
from .student import Turn, Wiring
from .teacher import TeacherUnavailable

CHOICES = ("auto", "none", "required")


class CausalTask:
    def __init__(self, bundle, wiring: Wiring, decoding=None):
        self.bundle, self.wiring, self.policy = bundle, wiring, bundle.policy
        self.decoding = decoding  # decode_loop.DecodeLoop, or None: one request per thread
        self.tools = {t["name"]: t for t in self.policy.tools}

    def describe(self) -> dict:
        if self.policy.task == "extract":
            return {"task": "extract", "output_schema": self.policy.output_schema}
        return {"task": "agent", "tools": sorted(self.tools)}

    async def answer(self, body: dict) -> Reply:
        messages = messages_of(body)
        if isinstance(body.get("n"), int) and body["n"] > 1:
            raise ApiError(400, "n > 1 is not supported: the student answers one choice", "n")
        if self.policy.task == "extract":
            input, extra = self._extract_request(body, messages)
        else:
            input, extra = self._agent_request(body, messages)
        try:
            self.policy.check_input(input)
        except InputError as exc:  # an offered tool or tool_choice the bundle lacks is a 400
            status = 400 if exc.path in ("$.tools", "$.tool_choice") else 422
            raise ApiError(status, str(exc), "input_schema") from None  # runtime/inputs.py
        limit = max_tokens(body)
        if self.decoding is not None:
            result = await self.decoding.predict(input, limit)
        else:
            result = await self.wiring.student.run(self.bundle.answer, input, None, limit)
        if not any(m.get("role") in ("system", "developer") for m in messages):
            messages = [{"role": "system", "content": self.policy.description}, *messages]
        turn = Turn(input, messages, extra, result, self._student_reply(result))
        return await self.wiring.finish(self, turn)

    # ------------------------------------------------------------------ requests

    def _agent_request(self, body: dict, messages: list[dict]) -> tuple[dict, dict]:
        offered = [self._offered_tool(t, i) for i, t in enumerate(body.get("tools") or ())]
        input: dict[str, Any] = {"messages": [runtime_message(m) for m in messages]}
        if offered:
            input["tools"] = offered
        choice = body.get("tool_choice")
        if choice is not None:
            input["tool_choice"] = tool_choice(choice)
        tools = [openai_tool(self.tools[n]) for n in offered or self.tools]
        return input, {"tools": tools, "tool_choice": choice}

    def _offered_tool(self, tool: Any, i: int) -> str:
        function = tool.get("function") if isinstance(tool, dict) else None
        if not isinstance(function, dict) or tool.get("type", "function") != "function":
            raise ApiError(400, f"tools[{i}] must be {{\"type\": \"function\", \"function\": "
                           "{name, parameters}}", "invalid_tool")
        name = function.get("name")
        known = self.tools.get(name)
        if known is None:
            raise ApiError(400, f"tools[{i}]: {name!r} is not one of this bundle's tools "
                           f"({', '.join(self.tools)})", "unknown_tool")
        if (function.get("parameters") or {}) != known["parameters"]:
            raise ApiError(400, f"tools[{i}]: {name!r} has a parameters schema that differs "
                           f"from the bundle's: {dumps(known['parameters'])}", "tool_mismatch")
        return name

    def _extract_request(self, body: dict, messages: list[dict]) -> tuple[dict, dict]:
        if body.get("tools"):
            raise ApiError(400, "this bundle extracts JSON; it calls no tools", "unknown_tool")
        fmt = body.get("response_format")
        kind = fmt.get("type") if isinstance(fmt, dict) else fmt
        if kind == "json_schema":
            schema = (fmt.get("json_schema") or {}).get("schema")
            if schema != self.policy.output_schema:
                raise ApiError(400, "response_format.json_schema.schema must equal the bundle's "
                               f"output schema: {dumps(self.policy.output_schema)}",
                               "response_format")
        elif kind not in (None, "text", "json_object"):
            raise ApiError(400, f"response_format type {kind!r} is not text, json_object or "
                           "json_schema", "response_format")
        input = bundle_input(messages, self.policy.text_field, "extract from")
        schema_format = {"type": "json_schema", "json_schema": {
            "name": "extraction", "schema": self.policy.output_schema}}
        return input, {"response_format": schema_format}

    # ------------------------------------------------------------------ answers

    def _student_reply(self, result: dict) -> Reply:
        output = result["output"]
        if self.policy.task == "extract":
            message = {"role": "assistant", "content": None if output is None else dumps(output)}
        else:
            message = with_call_ids(output)
        finish = ("tool_calls" if message.get("tool_calls") else
                  "length" if result.get("truncated") else "stop")
        usage = {"prompt_tokens": result["prompt_tokens"], "completion_tokens": result["tokens"],
                 "total_tokens": result["prompt_tokens"] + result["tokens"]}
        info = {"route": result["route"], "reason": result["reason"],
                "confidence": round(result["confidence"], 4)}
        return Reply(message, info, usage, finish)

    def teacher_reply(self, turn: Turn, answer, info: dict) -> Reply:
        """The teacher's answer when it fits the bundle; else TeacherUnavailable."""
        message = self._checked(answer.message, turn.extra)
        finish = "tool_calls" if message.get("tool_calls") else "stop"
        return Reply(message, info, answer.usage, finish)

    def log_row(self, turn: Turn, reply: Reply) -> dict:
        meta = {"reason": turn.student.info["reason"],
                "student_confidence": round(turn.result["confidence"], 4),
                "student_output": turn.result["output"], "model": self.wiring.teacher.model}
        if self.policy.task == "extract":
            return extract_row(turn.input, json.loads(reply.message["content"]), meta)
        return agent_row(turn.messages, turn.extra["tools"], reply.message, meta)

    def compare(self, turn: Turn, reply: Reply) -> tuple[bool, str]:
        """(whether the answers agree as evaluate scores them, the student's tool or `text`)."""
        student = turn.student.message
        if self.policy.task == "extract":
            return (structured.extraction_agrees(student.get("content"),
                                                 json.loads(reply.message["content"])), "extract")
        calls = student.get("tool_calls") or ()
        return (structured.turn_agrees(student, reply.message),
                calls[0]["function"]["name"] if calls else "text")

    def _checked(self, message: dict, extra: dict) -> dict:
        """The teacher's message when it fits the bundle, with call ids; else TeacherUnavailable."""
        if self.policy.task == "extract":
            try:
                value = json.loads(message.get("content") or "")
                jsonschema.validate(value, self.policy.output_schema)
            except (ValueError, jsonschema.ValidationError) as exc:
                raise TeacherUnavailable("the teacher's extraction does not fit the output "
                                         f"schema: {str(exc).splitlines()[0][:160]}") from None
            return {"role": "assistant", "content": dumps(value)}
        offered = {t["function"]["name"]: t["function"]["parameters"] for t in extra["tools"]}
        for call in message.get("tool_calls") or ():
            name = call["function"]["name"]
            try:
                jsonschema.validate(json.loads(call["function"]["arguments"]), offered[name])
            except KeyError:
                raise TeacherUnavailable(f"the teacher called {name!r}, which was not offered") from None
            except (ValueError, jsonschema.ValidationError) as exc:
                raise TeacherUnavailable(f"the teacher's call to {name!r} has invalid arguments: "
                                         f"{str(exc).splitlines()[0][:160]}") from None
        return with_call_ids(message)


def runtime_message(m: dict) -> dict:
    """An OpenAI message as the runtime reads it: text content, calls with their arguments."""
    role = "system" if m["role"] == "developer" else m["role"]
    content = m.get("content")
    out: dict[str, Any] = {"role": role, "content": None if content is None else content_text(content)}
    if m.get("tool_calls"):
        try:
            out["tool_calls"] = [{"type": "function", "function": {
                "name": c["function"]["name"], "arguments": c["function"].get("arguments") or "{}"}}
                for c in m["tool_calls"]]
        except (KeyError, TypeError):
            raise ApiError(400, "each tool call must be {\"function\": {\"name\", \"arguments\"}}",
                           "invalid_message") from None
    return out


def max_tokens(body: dict) -> int | None:
    """The caller's cap on the answer's tokens (max_completion_tokens, or the older
    max_tokens); it can lower the bundle's limit, never raise it."""
    for key in ("max_completion_tokens", "max_tokens"):
        value = body.get(key)
        if value is None:
            continue
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ApiError(400, f"{key} must be a positive integer", key)
        return value
    return None


def tool_choice(choice: Any) -> Any:
    if choice in CHOICES:
        return choice
    if isinstance(choice, dict) and isinstance((choice.get("function") or {}).get("name"), str):
        return {"type": "function", "function": {"name": choice["function"]["name"]}}
    raise ApiError(400, "tool_choice must be auto, none, required or {\"type\": \"function\", "
                   "\"function\": {\"name\": ...}}", "invalid_tool_choice")


def openai_tool(tool: dict) -> dict:
    return {"type": "function", "function": {"name": tool["name"],
                                             "description": tool.get("description", ""),
                                             "parameters": tool["parameters"]}}
