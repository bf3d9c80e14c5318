"""The edge runtime for extract and agent bundles: a decoder student that answers in JSON or calls
tools, and the policy that routes its answers.

The compiler's evaluation answers through this policy and the decoder, so it fits the threshold
on exactly what this file applies, and the student's training prompts are built from the same
chat format (`ChatFormat.system_text`, `user_text`).

    bundle = load_bundle("build/support-agent/bundle")
    bundle.predict({"messages": [{"role": "user", "content": "where is HB-10234?"}]})
    # {"output": {"role": "assistant", "content": None, "tool_calls": [{"type": "function",
    #   "function": {"name": "get_order", "arguments": "{\"order_id\": \"HB-10234\"}"}}]},
    #  "confidence": 0.91, "route": "student", "reason": "confidence 0.91 >= 0.40"}

The tool-calling loop belongs to the host: it runs each call, appends the assistant message
and a `{"role": "tool", "content": ...}` message per call, and asks again. A request may name
the tools offered (`"tools": ["get_order"]`) and a `tool_choice` as in OpenAI's API (`auto`,
`none`, `required`, `{"type": "function", "function": {"name": ...}}`), which the decoder
enforces. Extract requests
are the input object (`{"message": "..."}`); the output is the extracted JSON object.

Routes, first match wins: a trigger on the request's text sends it to the teacher; an output
cut short by max_new_tokens goes to the teacher; an agent reply equal to a refusal's response
is a refusal; a confidence under the threshold goes to the teacher; the rest is the student's.
Every extraction and every tool call the student emits validates against its schema, because
decoding was constrained to it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jsonschema

from .chat_format import ChatFormat, user_text
from .format import (
    DECODER_TASKS,
    POLICY_FILE,
    POLICY_FORMAT,
    BundleError,
    InputError,
    check_inputs,
    read_triggers,
)
from .inputs import (
    MAX_MESSAGE_CHARS,
    check_text,
    check_values,
    cut,
    parse_json,
    schema_error,
)

# What an agent request looks like: OpenAI chat messages, optionally naming the tools offered.
# Every level the chat format reads is typed, so a wrong type anywhere is an InputError with
# its path, never a KeyError inside rendering.
TOOL_CALL_SCHEMA = {
    "type": "object",
    "properties": {"id": {"type": "string"}, "type": {"const": "function"},
                   "function": {"type": "object",
                                "properties": {"name": {"type": "string", "minLength": 1},
                                               "arguments": {"type": ["string", "object", "null"]}},
                                "required": ["name"]}},
    "required": ["function"],
}
AGENT_INPUT_SCHEMA = {
    "type": "object",
    "properties": {
        "messages": {"type": "array", "minItems": 1, "items": {
            "type": "object",
            "properties": {"role": {"enum": ["system", "user", "assistant", "tool"]},
                           "content": {"type": ["string", "null"]},
                           "tool_calls": {"type": ["array", "null"], "items": TOOL_CALL_SCHEMA},
                           "tool_call_id": {"type": "string"}, "name": {"type": "string"}},
            "required": ["role"]}},
        "tools": {"type": "array", "items": {"type": "string"}},
        # OpenAI's: "auto" | "none" | "required" | {"type": "function", "function": {"name"}}
        "tool_choice": {"anyOf": [
            {"enum": ["auto", "none", "required"]},
            {"type": "object", "properties": {"function": {
                "type": "object", "properties": {"name": {"type": "string"}},
                "required": ["name"]}}, "required": ["function"]}]},
    },
    "required": ["messages"],
}


@dataclass(frozen=True)
class Routed:
    confidence: float
    route: str   # "student" | "teacher" | "refusal"
    reason: str
    rule: str    # trigger | truncated | refusal | low_confidence | confident


def check_conversation(messages: list[dict]) -> None:
    """An agent request needs a user turn with text, and tool-call arguments given as a string
    must be JSON (the chat format parses them)."""
    users = [i for i, m in enumerate(messages) if m["role"] == "user"]
    if not users:
        raise InputError("the conversation has no user message", "$.messages")
    check_text(messages[users[-1]].get("content") or "", f"$.messages[{users[-1]}].content")
    for i, m in enumerate(messages):
        for j, call in enumerate(m.get("tool_calls") or ()):
            arguments = call["function"].get("arguments")
            if isinstance(arguments, str):
                where = f"$.messages[{i}].tool_calls[{j}].function.arguments"
                value = parse_json(arguments, where)
                check_values(value, where)


class CausalPolicy:
    """policy.json of an extract or agent bundle."""

    def __init__(self, data: dict):
        if data.get("format") != POLICY_FORMAT:
            raise BundleError(f"{POLICY_FILE}: format {data.get('format')!r} is not supported "
                              f"(this runtime reads format {POLICY_FORMAT})")
        if data.get("task") not in DECODER_TASKS:
            raise BundleError(f"{POLICY_FILE}: task {data.get('task')!r} is not extract or agent")
        try:
            self.task: str = data["task"]
            self.chat = ChatFormat.from_dict(data["chat"])
            self.description: str = data.get("description", "")
            self.tools: list[dict] = list(data.get("tools", ()))
            self.output_schema: dict | None = data.get("output_schema")
            self.input_schema: dict = data.get("input_schema") or AGENT_INPUT_SCHEMA
            self.text_field: str | None = data.get("text_field")
            self.max_new_tokens = int(data["max_new_tokens"])
            self.threshold = float(data.get("threshold", 0.0))
            self.refusals: dict[str, str] = dict(data.get("refusals", {}))
            self.triggers = read_triggers(data)
        except (KeyError, TypeError, ValueError, re.error) as exc:
            raise BundleError(f"{POLICY_FILE}: malformed policy ({type(exc).__name__}: {exc})") from None
        if self.task == "extract" and not isinstance(self.output_schema, dict):
            raise BundleError(f"{POLICY_FILE}: an extract policy needs output_schema")
        self.data = data
        self.validator = jsonschema.validators.validator_for(
            self.input_schema, default=jsonschema.Draft202012Validator)(self.input_schema)

    # ------------------------------------------------------------------ requests

    def check_input(self, input: Any) -> None:
        """Refuse, as InputError, anything the student cannot be asked: see runtime/inputs.py."""
        check_values(input)
        error = schema_error(self.validator, input)
        if error is not None:
            raise error
        if self.task == "extract":
            if self.text_field is not None:
                check_text(input.get(self.text_field), f"$.{self.text_field}")
            return
        unknown = sorted(set(input.get("tools") or ()) - {t["name"] for t in self.tools})
        if unknown:
            raise InputError(cut(f"unknown tools {unknown}; the bundle knows "
                                 f"{[t['name'] for t in self.tools]}", MAX_MESSAGE_CHARS),
                             "$.tools")
        named = _named_choice(input.get("tool_choice"))
        if named is not None and named not in {t["name"] for t in self.offered(input)}:
            raise InputError(f"tool_choice names {cut(repr(named))}, which is not among the "
                             "tools offered", "$.tool_choice")
        check_conversation(input["messages"])

    def offered(self, input: dict) -> list[dict]:
        names = input.get("tools")
        return self.tools if not names else [t for t in self.tools if t["name"] in set(names)]

    def prompt(self, input: dict) -> str:
        """The text the student continues: system turn and messages as the chat format
        prepares them for training too."""
        if self.task == "extract":
            messages = [{"role": "user", "content": user_text(input, self.text_field)}]
            system = self.chat.system_text(self.description, output_schema=self.output_schema)
            return self.chat.render(self.chat.prepare(messages, system), add_generation_prompt=True)
        tools = self.offered(input)
        system = self.chat.system_text(self.description, tools)
        return self.chat.render(self.chat.prepare(input["messages"], system, tools),
                                add_generation_prompt=True)

    def shared_prefix(self) -> str:
        """The start every request's prompt shares: the system turn (for an agent, with all
        the bundle's tools offered, as requests that name no tools get it)."""
        if self.task == "extract":
            system = self.chat.system_text(self.description, output_schema=self.output_schema)
            return self.chat.render(self.chat.prepare([], system))
        system = self.chat.system_text(self.description, self.tools)
        return self.chat.render(self.chat.prepare([], system, self.tools))

    def trigger_text(self, input: dict) -> str:
        """What trigger patterns read: the extraction input, or the agent's last user turn."""
        if self.task == "extract":
            return user_text(input, self.text_field)
        users = [m.get("content") or "" for m in input["messages"] if m.get("role") == "user"]
        return users[-1] if users else ""

    # ------------------------------------------------------------------ answers

    def output(self, message: dict) -> Any:
        """What the caller gets: the extracted object, or the assistant message."""
        if self.task == "extract":
            import json

            try:
                return json.loads(message.get("content") or "")
            except ValueError:
                return None
        return message

    def decide(self, text: str, message: dict, confidence: float, truncated: bool) -> Routed:
        trigger = next((t for t in self.triggers if t.pattern.search(text)), None)
        if trigger is not None:
            return Routed(confidence, "teacher", f"trigger: {trigger.reason}", "trigger")
        if truncated:
            return Routed(confidence, "teacher",
                          f"output cut at max_new_tokens {self.max_new_tokens}", "truncated")
        refusal = self.refusal_of(message)
        if refusal is not None:
            return Routed(confidence, "refusal", f"refusal: {refusal}", "refusal")
        if confidence < self.threshold:
            return Routed(confidence, "teacher",
                          f"low confidence {confidence:.2f} < {self.threshold:.2f}", "low_confidence")
        return Routed(confidence, "student",
                      f"confidence {confidence:.2f} >= {self.threshold:.2f}", "confident")

    def refusal_of(self, message: dict) -> str | None:
        content = (message.get("content") or "").strip()
        if self.task != "agent" or message.get("tool_calls") or not content:
            return None
        return next((name for name, response in self.refusals.items()
                     if content == response.strip()), None)

    def mode(self, input: dict):
        from .decoder import Agent, Extract

        if self.task == "extract":
            return Extract(self.output_schema)
        choice, tools = input.get("tool_choice") or "auto", self.offered(input)
        named = _named_choice(choice)
        if named is not None:  # a named function: a call is required, to that tool only
            return Agent([t for t in tools if t["name"] == named], "required")
        return Agent(tools, choice)


def _named_choice(choice: Any) -> str | None:
    """The tool a `{"function": {"name": ...}}` tool_choice names, else None."""
    return choice["function"]["name"] if isinstance(choice, dict) else None


class CausalBundle:
    """A loaded extract or agent bundle: decoder, policy and verified manifest."""

    def __init__(self, root: Path, policy: CausalPolicy, decoder, manifest: dict):
        self.root, self.policy, self.decoder, self.manifest = root, policy, decoder, manifest

    def predict(self, input: dict) -> dict:
        return self.predict_batch([input])[0]

    def predict_batch(self, inputs: list[dict], rows: int = 8) -> list[dict]:
        """Answer the requests, up to `rows` decoded together (Decoder.generate_many: the
        answers each gets alone); one invalid input, or one whose prompt cannot fit the
        decoder's context, rejects the batch before any decoding."""
        check_inputs(self.policy, inputs)
        where = "$.messages" if self.policy.task == "agent" else "$"
        prompts = [self.prompt_ids(item, f"$[{i}]{where[1:]}" if len(inputs) > 1 else where)
                   for i, item in enumerate(inputs)]
        modes = [self.policy.mode(item) for item in inputs]
        completions = self.decoder.generate_many(prompts, modes, self.policy.max_new_tokens,
                                                 rows if self.decoder.graph_batches else 1)
        return [self.result(item, c) for item, c in zip(inputs, completions)]

    def prompt_ids(self, input: dict, where: str = "$") -> list[int]:
        """The prompt's token ids; InputError when they leave no room in the context."""
        prompt = self.policy.prompt(input)
        context = self.decoder.spec.context_length
        # No token stands for more characters than the vocabulary's longest entry, so a prompt
        # longer than this cannot fit: refused without tokenizing megabytes first.
        most_chars = context * self.decoder.max_token_chars
        if len(prompt) > most_chars:
            raise InputError(f"the prompt is {len(prompt)} characters; this student reads at "
                             f"most {context} tokens (about {most_chars} characters)", where)
        ids = self.decoder.encode(prompt)
        if len(ids) >= context:
            raise InputError(f"the prompt is {len(ids)} tokens; this student reads at most "
                             f"{context} tokens, answer included", where)
        return ids

    def answer(self, input: dict, prompt_ids: list[int] | None = None,
               max_new_tokens: int | None = None) -> dict:
        """One validated request through the decoder and the policy; `max_new_tokens` (a
        caller's max_tokens) may lower the policy's limit."""
        ids = self.prompt_ids(input) if prompt_ids is None else prompt_ids
        limit = self.limit(max_new_tokens)
        return self.result(input, self.decoder.generate(ids, self.policy.mode(input), limit),
                           limit)

    def begin(self, input: dict, max_new_tokens: int | None = None):
        """A validated request, prefilled and ready to decode (Decoder.begin): what a server
        that batches requests as they arrive starts from; `result` routes its completion."""
        return self.decoder.begin(self.prompt_ids(input), self.policy.mode(input),
                                  self.limit(max_new_tokens))

    def limit(self, max_new_tokens: int | None) -> int:
        cap = self.policy.max_new_tokens
        return cap if max_new_tokens is None else max(1, min(cap, max_new_tokens))

    def result(self, input: dict, completion, limit: int | None = None) -> dict:
        """The answer to `input` from its completion: output, confidence and route. An answer
        cut at a limit the caller set below the policy's is what the caller asked for: it is
        not escalated for being cut (the policy's own limit is: the student ran out)."""
        capped = limit is not None and limit < self.policy.max_new_tokens
        cut_by_policy = completion.truncated and not (capped and completion.new_tokens >= limit)
        routed = self.policy.decide(self.policy.trigger_text(input), completion.message,
                                    completion.confidence, cut_by_policy)
        return {"output": self.policy.output(completion.message),
                "confidence": routed.confidence, "route": routed.route, "reason": routed.reason,
                "tokens": completion.new_tokens, "truncated": completion.truncated,
                "prompt_tokens": completion.prompt_tokens}


def load_causal(root: Path, policy_data: dict, manifest: dict,
                    threads: int | None = None) -> CausalBundle:
    from .decoder import Decoder

    policy = CausalPolicy(policy_data)
    try:
        decoder = Decoder(root, threads=threads)
        decoder.warm(policy.shared_prefix())
    except BundleError:
        raise
    except Exception as exc:  # onnxruntime and tokenizers raise their own untyped errors
        raise BundleError(f"cannot load the decoder: {exc}") from exc
    return CausalBundle(root, policy, decoder, manifest)
