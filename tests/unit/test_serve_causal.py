"""`distill serve` over agent and extract bundles, called as an agent host calls it: the `openai`
client against the server on a real socket, the tiny exported decoder as the student, and the
fake OpenAI-compatible teacher of teacher_server.py for escalations."""

from __future__ import annotations

import json

import jsonschema
import pytest
from teacher_server import FakeTeacher
from test_server import KEY_ENV, running
from tiny_causal import (
    EXTRACT_SCHEMA,
    TOOLS,
    causal_spec,
    fp32_export,
    write_causal_bundle,
)

from distill_compiler.teacher.logs import LogReader

openai = pytest.importorskip("openai", reason="the OpenAI client comes with litellm; absent in "
                             "a runtime-only install")

PARAMS = {t["name"]: t["parameters"] for t in TOOLS}
OPENAI_TOOLS = [{"type": "function", "function": {"name": t["name"], "description": t["description"],
                                                  "parameters": t["parameters"]}} for t in TOOLS]
WHERE = [{"role": "user", "content": "where is order A15"}]


@pytest.fixture(scope="module")
def teacher():
    with FakeTeacher() as fake:
        yield fake


def teacher_config(teacher) -> dict:
    return {"model": "openai/fake-teacher", "api_base": teacher.api_base, "api_key_env": KEY_ENV}


@pytest.fixture(scope="module")
def agent_bundle(tmp_path_factory, exported_causal, teacher):
    return write_causal_bundle(tmp_path_factory.mktemp("agent"), exported_causal, "agent",
                               teacher_config(teacher))


@pytest.fixture(scope="module")
def extract_bundle(tmp_path_factory, exported_causal, teacher):
    return write_causal_bundle(tmp_path_factory.mktemp("extract"), exported_causal, "extract",
                               teacher_config(teacher))


@pytest.fixture(scope="module")
def agent(agent_bundle, tmp_path_factory):
    log = tmp_path_factory.mktemp("agent-log") / "escalations.jsonl"
    with running(agent_bundle, log=log) as c:
        yield c, api(c), log


@pytest.fixture(scope="module")
def extract(extract_bundle, tmp_path_factory):
    log = tmp_path_factory.mktemp("extract-log") / "escalations.jsonl"
    with running(extract_bundle, log=log) as c:
        yield c, api(c), log


def api(client):
    return openai.OpenAI(base_url=f"http://127.0.0.1:{client.port}/v1", api_key="unused",
                         max_retries=0)


def valid_calls(message) -> list[tuple[str, dict]]:
    """(name, arguments) of each call, after checking it against its tool's schema."""
    out = []
    for call in message.tool_calls or ():
        assert call.type == "function" and call.id.startswith("call_")
        arguments = json.loads(call.function.arguments)
        jsonschema.validate(arguments, PARAMS[call.function.name])
        out.append((call.function.name, arguments))
    return out


def streamed(client, **kwargs) -> tuple[str | None, dict, str | None, int]:
    """(content, {index: (id, name, arguments)}, finish_reason, chunks) of a streamed answer."""
    content, calls, finish, n = None, {}, None, 0
    for chunk in client.chat.completions.create(stream=True, **kwargs):
        n += 1
        choice = chunk.choices[0]
        delta = choice.delta
        if delta.content:
            content = (content or "") + delta.content
        for call in delta.tool_calls or ():
            id_, name, args = calls.get(call.index, (None, None, ""))
            calls[call.index] = (call.id or id_, (call.function.name or name),
                                 args + (call.function.arguments or ""))
        finish = choice.finish_reason or finish
    return content, calls, finish, n


def test_agent_answers_with_schema_valid_tool_calls(agent):
    _, client, _ = agent
    raw = client.chat.completions.with_raw_response.create(
        model="tiny-agent", messages=WHERE, tools=OPENAI_TOOLS)
    reply = raw.parse()
    assert raw.headers["x-distill-route"] == "student"
    choice = reply.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.role == "assistant"
    assert [name for name, _ in valid_calls(choice.message)] == ["get_order"]
    assert reply.usage.prompt_tokens > 20 and reply.usage.completion_tokens > 5


def test_streamed_tool_calls_equal_the_plain_answer(agent):
    _, client, _ = agent
    plain = client.chat.completions.create(model="tiny-agent", messages=WHERE, tools=OPENAI_TOOLS)
    content, calls, finish, chunks = streamed(client, model="tiny-agent", messages=WHERE,
                                              tools=OPENAI_TOOLS)
    [call] = plain.choices[0].message.tool_calls
    assert finish == "tool_calls" and content is None and chunks > 3
    [(id_, name, arguments)] = calls.values()
    assert id_.startswith("call_") and name == call.function.name
    assert json.loads(arguments) == json.loads(call.function.arguments)


def test_tool_choice_is_enforced_by_the_decoder(agent):
    _, client, _ = agent

    def ask(choice, messages=WHERE):
        return client.chat.completions.create(model="tiny-agent", messages=messages,
                                              tools=OPENAI_TOOLS, tool_choice=choice).choices[0]

    none = ask("none")
    assert none.message.tool_calls is None and none.message.content
    assert none.finish_reason in ("stop", "length")
    named = ask({"type": "function", "function": {"name": "cancel_order"}})
    assert [n for n, _ in valid_calls(named.message)][:1] == ["cancel_order"]
    # After a tool result the student answers in text; `required` makes it call again.
    after = WHERE + [
        {"role": "assistant", "content": None, "tool_calls": [{
            "id": "call_1", "type": "function",
            "function": {"name": "get_order", "arguments": '{"order_id": "A15"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": '{"status": "shipped"}'}]
    assert ask("auto", after).message.tool_calls is None
    required = ask("required", after)
    assert required.finish_reason == "tool_calls" and valid_calls(required.message)


def test_offered_tools_must_be_the_bundles(agent):
    _, client, _ = agent
    changed = json.loads(json.dumps(OPENAI_TOOLS[:1]))
    changed[0]["function"]["parameters"]["properties"]["order_id"]["type"] = "integer"
    unknown = [{"type": "function", "function": {"name": "refund_all", "parameters": {}}}]
    for tools, code, named in ((changed, "tool_mismatch", "get_order"),
                               (unknown, "unknown_tool", "refund_all")):
        with pytest.raises(openai.BadRequestError) as failed:
            client.chat.completions.create(model="tiny-agent", messages=WHERE, tools=tools)
        error = failed.value.body
        assert error["code"] == code and named in error["message"], error
    with pytest.raises(openai.BadRequestError) as failed:
        client.chat.completions.create(model="tiny-agent", messages=WHERE, tools=OPENAI_TOOLS[:1],
                                       tool_choice={"type": "function",
                                                    "function": {"name": "cancel_order"}})
    assert "cancel_order" in failed.value.body["message"]
    # Offering one tool narrows the constraint to it.
    only = client.chat.completions.create(model="tiny-agent", messages=WHERE,
                                          tools=OPENAI_TOOLS[1:], tool_choice="required")
    assert [n for n, _ in valid_calls(only.choices[0].message)] == ["cancel_order"]


def test_escalated_turn_is_the_teachers_and_is_logged_in_chat_format(agent, teacher, tmp_path):
    _, client, log = agent
    teacher.reset_counts()
    messages = [{"role": "user", "content": "my lawyer asks where order A15 is"}]
    raw = client.chat.completions.with_raw_response.create(model="tiny-agent", messages=messages,
                                                           tools=OPENAI_TOOLS[1:])
    reply = raw.parse()
    assert (raw.headers["x-distill-route"], raw.headers["x-distill-reason"]) == (
        "teacher", "trigger: legal")
    assert [n for n, _ in valid_calls(reply.choices[0].message)] == ["cancel_order"]
    sent = teacher.bodies[-1]
    assert [t["function"]["name"] for t in sent["tools"]] == ["cancel_order"]
    assert sent["messages"][0] == {"role": "system", "content": "Fixture shop assistant."}
    [row] = [json.loads(line) for line in log.read_text().splitlines()
             if "lawyer" in line]
    [record] = LogReader(causal_spec("agent"), log.parent).replay((log.name,))[-1:]
    assert record["input"] == {"tools": ["cancel_order"]}
    assert record["messages"][0] == messages[0]
    assert record["messages"][1]["tool_calls"][0]["function"]["name"] == "cancel_order"
    assert row["escalation"]["reason"] == "trigger: legal"


def test_teacher_that_cannot_answer_falls_back_to_the_student(agent_bundle, teacher):
    with running(agent_bundle, env={}) as c:
        raw = api(c).chat.completions.with_raw_response.create(
            model="tiny-agent", tools=OPENAI_TOOLS,
            messages=[{"role": "user", "content": "my lawyer asks where order A15 is"}])
    assert raw.headers["x-distill-route"] == "student-fallback"
    assert raw.parse().distill["reason"].endswith(f"${KEY_ENV} is not set in the server's "
                                                  "environment")
    valid_calls(raw.parse().choices[0].message)


def test_extract_answers_json_content(extract):
    _, client, _ = extract
    messages = [{"role": "user", "content": "my order A21 came broken"}]
    fmt = {"type": "json_schema", "json_schema": {"name": "x", "schema": EXTRACT_SCHEMA}}
    reply = client.chat.completions.create(model="tiny-extract", messages=messages,
                                           response_format=fmt)
    value = json.loads(reply.choices[0].message.content)
    jsonschema.validate(value, EXTRACT_SCHEMA)
    assert reply.choices[0].finish_reason == "stop" and reply.distill["route"] == "student"
    content, calls, finish, _ = streamed(client, model="tiny-extract", messages=messages)
    assert json.loads(content) == value and not calls and finish == "stop"
    other = {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object"}}}
    with pytest.raises(openai.BadRequestError) as failed:
        client.chat.completions.create(model="tiny-extract", messages=messages,
                                       response_format=other)
    assert failed.value.body["code"] == "response_format"


def test_extract_escalation_returns_and_logs_the_teachers_object(extract, teacher):
    _, client, log = extract
    teacher.reset_counts()
    reply = client.chat.completions.create(
        model="tiny-extract", messages=[{"role": "user", "content": "my lawyer: order A21 broke"}])
    value = json.loads(reply.choices[0].message.content)
    assert reply.distill["route"] == "teacher"
    jsonschema.validate(value, EXTRACT_SCHEMA)
    sent = teacher.bodies[-1]
    assert sent["response_format"]["json_schema"]["schema"] == EXTRACT_SCHEMA
    row = json.loads(log.read_text().splitlines()[-1])
    assert row["input"] == {"message": "my lawyer: order A21 broke"} and row["output"] == value


def test_mirrored_agent_turns_are_compared_call_by_call(agent_bundle, teacher, tmp_path):
    """The fake teacher fills order_id with a word of the message ("where"), the student with
    an order id: same tool, different arguments, so the pair disagrees, as evaluate scores it."""
    import time

    from distill_compiler.serve.shadow import ShadowConfig

    log = tmp_path / "shadow.jsonl"
    with running(agent_bundle, shadow=ShadowConfig(rate=1.0, workers=1), shadow_log=log) as c:
        reply = api(c).chat.completions.create(model="tiny-agent", messages=WHERE,
                                               tools=OPENAI_TOOLS)
        deadline = time.monotonic() + 10
        while not (m := c.metrics()).get('distill_shadow_pairs_total{route="student",'
                                         'key="get_order"}'):
            assert time.monotonic() < deadline
            time.sleep(0.01)
    [(name, arguments)] = valid_calls(reply.choices[0].message)
    assert name == "get_order" and arguments["order_id"].startswith("A")
    assert m['distill_shadow_agreements_total{route="student",key="get_order"}'] == 0
    [record] = LogReader(causal_spec("agent"), tmp_path).replay((log.name,))
    assert json.loads(record["messages"][-1]["tool_calls"][0]["function"]["arguments"]) == {
        "order_id": "where"}


QUESTIONS = ["where is order A15", "hi there", "I want to return order B7, it came broken",
             "track A3", "what can you do for me today", "order C12 status?", "cancel it",
             "my parcel A99 never arrived"]


@pytest.fixture(scope="module")
def fp32_agent_bundle(tmp_path_factory, exported_causal, teacher):
    """The agent bundle with the fp32 graph, whose logits batching leaves as they are (an int8
    graph's move with the batch: test_batched_decode.py)."""
    fp32 = fp32_export(tmp_path_factory.mktemp("fp32") / "export", exported_causal)
    return write_causal_bundle(tmp_path_factory.mktemp("agent-fp32"), fp32, "agent",
                               teacher_config(teacher))


@pytest.mark.parametrize("batch_rows", [4, 1])
def test_concurrent_requests_get_the_answers_each_gets_alone(fp32_agent_bundle, batch_rows):
    """Eight requests at once: decoded together in batches of 4 (or one per thread with
    --batch-rows 1), every one answered, each with what the bundle answers it alone."""
    from concurrent.futures import ThreadPoolExecutor

    from distill_compiler.runtime import load_bundle

    agent_bundle = fp32_agent_bundle
    bundle = load_bundle(agent_bundle, threads=1)
    alone = [bundle.predict({"messages": [{"role": "user", "content": q}]}) for q in QUESTIONS]
    with running(agent_bundle, batch_rows=batch_rows) as c:
        client = api(c)

        def ask(question):
            return client.chat.completions.with_raw_response.create(
                model="tiny-agent", messages=[{"role": "user", "content": question}],
                tools=OPENAI_TOOLS)

        with ThreadPoolExecutor(len(QUESTIONS)) as pool:
            raw = list(pool.map(ask, QUESTIONS))
        _, _, health = c.request("GET", "/health")
    assert [r.http_response.status_code for r in raw] == [200] * len(QUESTIONS)
    widest = json.loads(health)["widest_batch"]
    assert widest is None if batch_rows == 1 else 1 < widest <= batch_rows
    for expected, response in zip(alone, raw):
        assert response.headers["x-distill-route"] == expected["route"]
        if expected["route"] != "student":
            continue  # the fake teacher answered instead
        message = response.parse().choices[0].message
        calls = [{"type": "function", "function": {"name": call.function.name,
                                                   "arguments": call.function.arguments}}
                 for call in message.tool_calls or ()]
        assert calls == (expected["output"].get("tool_calls") or [])
        assert message.content == expected["output"].get("content")
    assert any(e["route"] == "student" for e in alone)
