"""How a conversation becomes text for a causal-LM student, and how its output becomes a message.

One format serves training and the edge runtime, so the student is asked at run time exactly
what it was taught. A leaf module (standard library only): the runtime imports it next to
onnxruntime.

    <|im_start|>system
    {description}
    Tools (call one as <tool_call>{"name": ..., "arguments": {...}}</tool_call>):
    // Look up an order by id.
    get_order(order_id: string)<|im_end|>
    <|im_start|>user
    where is HB-12345?<|im_end|>
    <|im_start|>assistant
    <tool_call>{"name": "get_order", "arguments": {"order_id": "HB-12345"}}</tool_call><|im_end|>
    <|im_start|>tool
    {"status": "shipped"}<|im_end|>
    <|im_start|>assistant
    It shipped yesterday.<|im_end|>

- Turn markers are the tokenizer's own when it has a pair (Gemma's `<start_of_turn>`), else
  `<|im_start|>`/`<|im_end|>`, which training adds as special tokens. The end marker is the
  stop token.
- JSON (tool calls, extractions) is written the way `constrained.JsonConstraint` emits it:
  `json.dumps` separators, no ASCII escaping, object properties in the schema's order, so the
  constrained runtime can produce every target the student was trained on.
- TRL computes assistant-only loss from `{% generation %}` markers in a Jinja chat template;
  `jinja_template()` is that template. It prints what `render()` prints once the messages went
  through `prepare()` (system text composed, arguments re-serialised); a test holds them equal.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

CALL_OPEN = "<tool_call>"
CALL_CLOSE = "</tool_call>"
# Marker pairs a tokenizer may already have, preferred in this order; the first is the default.
KNOWN_MARKERS = (("<|im_start|>", "<|im_end|>"), ("<start_of_turn>", "<end_of_turn>"))
SEPARATORS = (", ", ": ")  # json.dumps's defaults, which constrained decoding also emits


def dumps(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False, separators=SEPARATORS)


def user_text(input: object, field: str | None) -> str:
    """The user turn of an extraction: the input's one text field, or the whole input as JSON."""
    if field and isinstance(input, dict) and isinstance(input.get(field), str) and len(input) == 1:
        return input[field]
    return input if isinstance(input, str) else dumps(input)


def order_like(value: Any, schema: dict | None) -> Any:
    """`value` with object keys in the schema's `properties` order (undeclared keys after, in
    their own order), recursively, so that serialising it matches constrained decoding."""
    if not isinstance(schema, dict):
        return value
    if isinstance(value, dict):
        props = schema.get("properties") or {}
        ordered = {k: order_like(value[k], props[k]) for k in props if k in value}
        ordered.update((k, v) for k, v in value.items() if k not in props)
        return ordered
    if isinstance(value, list):
        return [order_like(v, schema.get("items")) for v in value]
    return value


def signature(tool: dict) -> str:
    """A tool as a TypeScript-like signature, `start_return(order_id: string, reason: "damaged"
    | "other", items?: string[])`: a third of the tokens of its JSON Schema, which a student
    reads in every prompt. Keywords the signature leaves out (lengths, descriptions) still
    bind: the runtime constrains arguments to the full schema."""
    return f"{tool['name']}({_fields(tool.get('parameters') or {})})"


def _fields(schema: dict) -> str:
    required = set(schema.get("required") or ())
    return ", ".join(f"{name}{'' if name in required else '?'}: {type_signature(sub)}"
                     for name, sub in (schema.get("properties") or {}).items())


def type_signature(schema: Any) -> str:
    """A JSON Schema as a TypeScript-like type: `{issue: "late" | "other", refund?: boolean}`."""
    if not isinstance(schema, dict):
        return "any"
    if "const" in schema:
        return dumps(schema["const"])
    if "enum" in schema:
        return " | ".join(dumps(v) for v in schema["enum"])
    if "anyOf" in schema:
        return " | ".join(type_signature(branch) for branch in schema["anyOf"])
    types = schema.get("type")
    if isinstance(types, list):
        return " | ".join(type_signature({**schema, "type": t}) for t in types)
    if types == "object":
        return f"{{{_fields(schema)}}}"
    if types == "array":
        item = type_signature(schema.get("items"))
        return f"({item})[]" if " | " in item else f"{item}[]"
    return types or "any"


def call_schema(tools: Sequence[dict]) -> dict:
    """The JSON Schema of one tool call, `{"name": ..., "arguments": {...}}`, for any of `tools`:
    what the runtime constrains a call to between CALL_OPEN and CALL_CLOSE. Each tool's local
    `$ref`s (`#/$defs/...`) are re-pointed to where its parameters now sit."""
    def branch(tool: dict, at: str) -> dict:
        arguments = _rebased(tool["parameters"], f"{at}/properties/arguments")
        return {"type": "object", "properties": {"name": {"const": tool["name"]},
                                                 "arguments": arguments},
                "required": ["name", "arguments"]}

    if len(tools) == 1:
        return branch(tools[0], "#")
    return {"anyOf": [branch(t, f"#/anyOf/{i}") for i, t in enumerate(tools)]}


_VALUES = frozenset({"const", "enum", "default", "examples"})  # instances, not schemas


def _rebased(schema: Any, prefix: str) -> Any:
    """`schema` with its document-local `$ref`s (`#...`) prefixed by `prefix`."""
    if isinstance(schema, list):
        return [_rebased(s, prefix) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {}
    for key, value in schema.items():
        if key == "$ref" and isinstance(value, str) and value.startswith("#"):
            out[key] = prefix + value[1:]
        else:
            out[key] = value if key in _VALUES else _rebased(value, prefix)
    return out


def render_call(name: str, arguments: Any) -> str:
    return f'{CALL_OPEN}{{"name": {dumps(name)}, "arguments": {_as_text(arguments)}}}{CALL_CLOSE}'


def _as_text(arguments: Any) -> str:
    return arguments if isinstance(arguments, str) else dumps(arguments)


@dataclass(frozen=True)
class ChatFormat:
    start: str = KNOWN_MARKERS[0][0]
    end: str = KNOWN_MARKERS[0][1]

    @classmethod
    def for_vocabulary(cls, tokens: Iterable[str]) -> ChatFormat:
        """The first known marker pair the vocabulary has whole, else the default pair."""
        vocab = set(tokens)
        for start, end in KNOWN_MARKERS:
            if start in vocab and end in vocab:
                return cls(start, end)
        return cls()

    @classmethod
    def from_dict(cls, data: dict) -> ChatFormat:
        return cls(start=data["start"], end=data["end"])

    def to_dict(self) -> dict:
        return {"format": 1, **asdict(self), "call_open": CALL_OPEN, "call_close": CALL_CLOSE}

    # ------------------------------------------------------------------ messages

    def system_text(self, description: str, tools: Sequence[dict] = (),
                    output_schema: dict | None = None) -> str:
        """The system turn, the same in training and at run time: the task description, then
        for an extraction the output's type, for an agent each tool offered as a commented
        signature (see `signature`)."""
        if output_schema is not None:
            # The type, not the JSON Schema: a third of the tokens in every prompt, and the
            # runtime enforces the full schema anyway.
            return (f"{description.strip()}\nAnswer with JSON of type "
                    f"{type_signature(output_schema)}").strip()
        lines = [description.strip()] if description.strip() else []
        if tools:
            lines.append(f'Tools (call one as {CALL_OPEN}{{"name": ..., "arguments": {{...}}}}'
                         f'{CALL_CLOSE}):')
            for tool in tools:
                if tool.get("description"):
                    lines.append(f"// {tool['description'].strip()}")
                lines.append(signature(tool))
        return "\n".join(lines)

    def prepare(self, messages: Sequence[dict], system: str | None,
                tools: Sequence[dict] = ()) -> list[dict]:
        """Messages ready to render: a leading system turn (replacing any in `messages`) and
        tool-call arguments as JSON strings in the tools' schema order."""
        params = {t["name"]: t["parameters"] for t in tools}
        out = [{"role": "system", "content": system}] if system else []
        for m in messages:
            if m.get("role") == "system":
                continue
            message = {"role": m["role"], "content": m.get("content") or ""}
            if m.get("tool_calls"):
                message["tool_calls"] = [
                    {"type": "function", "function": {
                        "name": c["function"]["name"],
                        "arguments": dumps(order_like(_as_value(c["function"].get("arguments")),
                                                      params.get(c["function"]["name"])))}}
                    for c in m["tool_calls"]]
            out.append(message)
        return out

    def render(self, messages: Sequence[dict], add_generation_prompt: bool = False) -> str:
        """Prepared messages as the student reads them; with a generation prompt, the text the
        student continues to answer."""
        text = "".join(self.render_turn(m) for m in messages)
        return text + self.generation_prompt() if add_generation_prompt else text

    def render_turn(self, message: dict) -> str:
        role = message["role"]
        if role != "assistant":
            return f"{self.start}{role}\n{message.get('content') or ''}{self.end}\n"
        return f"{self.generation_prompt()}{self.assistant_body(message)}{self.end}\n"

    def generation_prompt(self) -> str:
        return f"{self.start}assistant\n"

    @staticmethod
    def assistant_body(message: dict) -> str:
        calls = "".join(render_call(c["function"]["name"], c["function"]["arguments"])
                        for c in message.get("tool_calls") or ())
        return (message.get("content") or "") + calls

    def jinja_template(self) -> str:
        """render() as a chat template, assistant turns (with their end marker) inside
        `{% generation %}` so TRL can mask everything else out of the loss."""
        return (
            "{%- for m in messages %}"
            "{%- if m.role == 'assistant' %}"
            "{{- '" + self.start + "assistant\\n' }}{%- generation %}"
            "{%- if m.content %}{{- m.content }}{%- endif %}"
            "{%- for c in m.tool_calls or [] %}"
            "{{- '" + CALL_OPEN + "{\"name\": \"' + c.function.name + '\", \"arguments\": ' "
            "+ c.function.arguments + '}" + CALL_CLOSE + "' }}"
            "{%- endfor %}"
            "{{- '" + self.end + "' }}{%- endgeneration %}{{- '\\n' }}"
            "{%- else %}"
            "{{- '" + self.start + "' + m.role + '\\n' + (m.content or '') + '" + self.end + "\\n' }}"
            "{%- endif %}"
            "{%- endfor %}"
            "{%- if add_generation_prompt %}{{- '" + self.start + "assistant\\n' }}{%- endif %}"
        )

    # ------------------------------------------------------------------ the student's answer

    def parse(self, completion: str) -> dict:
        """An assistant completion (text after the generation prompt) as a message:
        free text as `content`, each CALL_OPEN ... CALL_CLOSE as a tool call whose arguments
        are a JSON string. A call that is not valid JSON stays in the content."""
        text = completion.split(self.end, 1)[0]
        content, calls = [], []
        while CALL_OPEN in text:
            before, rest = text.split(CALL_OPEN, 1)
            body, sep, after = rest.partition(CALL_CLOSE)
            call = _as_call(body)
            if call is None:
                content.append(before + CALL_OPEN + body + sep)
            else:
                content.append(before)
                calls.append({"type": "function", "function": call})
            text = after
        content.append(text)
        message: dict = {"role": "assistant", "content": "".join(content).strip() or None}
        if calls:
            message["tool_calls"] = calls
        return message


def _as_value(arguments: Any) -> Any:
    if isinstance(arguments, str):
        try:
            return json.loads(arguments)
        except ValueError:
            return arguments
    return {} if arguments is None else arguments


def _as_call(body: str) -> dict | None:
    try:
        call = json.loads(body)
    except ValueError:
        return None
    if not (isinstance(call, dict) and isinstance(call.get("name"), str)
            and isinstance(call.get("arguments"), dict)):
        return None
    return {"name": call["name"], "arguments": dumps(call["arguments"])}
