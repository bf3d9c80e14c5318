"""The chat format: render() equals the Jinja template TRL trains with, JSON is laid out the way
constrained decoding emits it, and parse() inverts the assistant body."""

import json

import jsonschema
import pytest
from tiny_causal import TOOLS, agent_trace, build_chat_tokenizer, fixture_chat_text

from distill_compiler.runtime.chat_format import (
    CALL_CLOSE,
    CALL_OPEN,
    ChatFormat,
    call_schema,
    order_like,
    render_call,
)
from distill_compiler.runtime.constrained import JsonConstraint, Vocabulary


@pytest.fixture(scope="module")
def tokenizer():
    return build_chat_tokenizer(fixture_chat_text())


def test_render_equals_the_chat_template_trl_trains_with(tokenizer):
    chat = ChatFormat()
    system = chat.system_text("Fixture shop assistant.", TOOLS)
    for i in range(4):
        messages = chat.prepare(agent_trace(i), system, TOOLS)
        for prompt in (False, True):
            expected = tokenizer.apply_chat_template(messages, tokenize=False,
                                                     add_generation_prompt=prompt)
            assert chat.render(messages, add_generation_prompt=prompt) == expected


def test_assistant_mask_covers_exactly_the_assistant_turns(tokenizer):
    chat = ChatFormat()
    messages = chat.prepare(agent_trace(1), chat.system_text("Shop.", TOOLS), TOOLS)
    out = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True,
                                        return_assistant_tokens_mask=True)
    ids, mask = out["input_ids"], out["assistant_masks"]
    learned = tokenizer.decode([t for t, m in zip(ids, mask) if m])
    assistant = [m for m in messages if m["role"] == "assistant"]
    assert learned == "".join(chat.assistant_body(m) + chat.end for m in assistant)


def test_arguments_follow_schema_order_whatever_the_log_did():
    chat = ChatFormat()
    call = {"function": {"name": "cancel_order",
                         "arguments": json.dumps({"reason": "other", "order_id": "A1"})}}
    [message] = chat.prepare([{"role": "assistant", "content": None, "tool_calls": [call]}],
                             None, TOOLS)
    assert message["tool_calls"][0]["function"]["arguments"] == \
        '{"order_id": "A1", "reason": "other"}'
    nested = {"type": "object", "properties": {"b": {"type": "object", "properties": {
        "y": {"type": "string"}, "x": {"type": "string"}}}, "a": {"type": "string"}}}
    assert list(order_like({"a": "1", "b": {"x": "2", "y": "3"}, "z": 0}, nested)) == ["b", "a", "z"]
    assert list(order_like({"b": {"x": "2", "y": "3"}}, nested)["b"]) == ["y", "x"]


def test_constrained_decoding_can_emit_every_rendered_call(tokenizer):
    """A rendered call, fed token by token as training tokenizes it, is accepted by the agent
    grammar (each tool's schema): the runtime can reproduce what the student was trained on."""
    vocab = Vocabulary(tokenizer.backend_tokenizer.to_str(), len(tokenizer),
                       [tokenizer.eos_token_id])
    constraint = JsonConstraint.for_tools(TOOLS, "required", vocab)
    for name, args in (("get_order", {"order_id": "A12"}),
                       ("cancel_order", {"order_id": "A13", "reason": "too_late"})):
        body = render_call(name, order_like(args, next(t for t in TOOLS if t["name"] == name)["parameters"]))
        guide = constraint.start()
        for token in tokenizer.encode(body, add_special_tokens=False):
            assert guide.mask()[token]
            guide.advance(token)
        assert guide.accepting


def test_call_schema_repoints_each_tools_refs():
    """$refs are relative to the document, and a tool's parameters move inside the call
    schema: they must still resolve there, for jsonschema as for the decoder."""
    params = {"type": "object", "$defs": {"id": {"type": "string", "pattern": "^A[0-9]+$"}},
              "properties": {"order_id": {"$ref": "#/$defs/id"},
                             "note": {"const": {"$ref": "#kept"}}}}
    tools = [{"name": "a", "parameters": params}, {"name": "b", "parameters": params}]
    schema = call_schema(tools)
    arguments = schema["anyOf"][1]["properties"]["arguments"]
    assert arguments["properties"]["order_id"]["$ref"] == "#/anyOf/1/properties/arguments/$defs/id"
    assert arguments["properties"]["note"]["const"] == {"$ref": "#kept"}  # a value, not a ref
    jsonschema.validate({"name": "b", "arguments": {"order_id": "A1"}}, schema)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({"name": "b", "arguments": {"order_id": "B1"}}, schema)
    single = call_schema(tools[:1])["properties"]["arguments"]["properties"]["order_id"]
    assert single["$ref"] == "#/properties/arguments/$defs/id"


def test_parse_inverts_the_assistant_body():
    chat = ChatFormat()
    message = {"role": "assistant", "content": "Let me check.", "tool_calls": [
        {"type": "function", "function": {"name": "get_order", "arguments": '{"order_id": "A1"}'}}]}
    parsed = chat.parse(chat.assistant_body(message) + chat.end + "trailing")
    assert parsed == message
    assert chat.parse("just text<|im_end|>") == {"role": "assistant", "content": "just text"}
    broken = f'{CALL_OPEN}{{"name": "get_order", "arguments": }}{CALL_CLOSE}'
    assert chat.parse(broken) == {"role": "assistant", "content": broken}


def test_markers_come_from_the_vocabulary_when_it_has_a_pair():
    assert ChatFormat.for_vocabulary(["<start_of_turn>", "<end_of_turn>", "a"]) == \
        ChatFormat("<start_of_turn>", "<end_of_turn>")
    assert ChatFormat.for_vocabulary(["<start_of_turn>", "a"]) == ChatFormat()
    assert ChatFormat.from_dict(ChatFormat("<s>", "</s>").to_dict()) == ChatFormat("<s>", "</s>")


def test_call_schema_is_one_branch_per_tool():
    schema = call_schema(TOOLS)
    assert [b["properties"]["name"]["const"] for b in schema["anyOf"]] == ["get_order", "cancel_order"]
    assert call_schema(TOOLS[:1])["properties"]["arguments"] == TOOLS[0]["parameters"]


def test_tools_are_offered_as_compact_signatures():
    from distill_compiler.runtime.chat_format import signature

    assert signature(TOOLS[1]) == \
        'cancel_order(order_id: string, reason: "changed_mind" | "too_late" | "other")'
    nested = {"name": "f", "parameters": {"type": "object", "required": ["a"], "properties": {
        "a": {"type": "array", "items": {"anyOf": [{"type": "integer"}, {"const": None}]}},
        "b": {"type": "object", "properties": {"c": {"type": ["string", "null"]}}}}}}
    assert signature(nested) == "f(a: (integer | null)[], b?: {c?: string | null})"
    text = ChatFormat().system_text("Shop.", TOOLS)
    assert text.splitlines()[2:4] == ["// Look up an order by id.", "get_order(order_id: string)"]
