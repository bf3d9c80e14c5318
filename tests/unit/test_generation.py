import json
import shutil
import subprocess
import sys
from pathlib import Path

import jsonschema
import numpy as np
import pytest
from tiny_causal import (
    EXTRACT_SCHEMA,
    RICH_TOOLS,
    TOOLS,
    agent_record,
    causal_spec,
    extract_record,
)

from distill_compiler.runtime import decoder as generation
from distill_compiler.runtime.chat_format import CALL_OPEN, ChatFormat
from distill_compiler.runtime.decoder import Agent, Decoder, Extract
from distill_compiler.students.causal.data import points, spec_tools

CHAT = ChatFormat()
# The fixture schema with its one free string bounded, so that even random weights finish.
BOUNDED = {**EXTRACT_SCHEMA, "properties": {**EXTRACT_SCHEMA["properties"],
                                            "order_id": {"type": "string", "maxLength": 8}}}


def prompts(task: str, ids) -> list[str]:
    make = agent_record if task == "agent" else extract_record
    return [CHAT.render(p.prompt, add_generation_prompt=True)
            for i in ids for p in points(make(i), causal_spec(task), CHAT)]


@pytest.fixture(scope="module")
def untrained(exported_causal, tmp_path_factory) -> Path:
    """The exported graph with every weight replaced by random values: a model that knows
    nothing, to show the constraint alone keeps outputs valid."""
    import onnx
    from onnx import numpy_helper

    out = tmp_path_factory.mktemp("untrained")
    for name in ("decoder.json", "tokenizer.json", "chat.json"):
        shutil.copyfile(exported_causal / name, out / name)
    model = onnx.load(str(exported_causal / "model.fp32.onnx"))
    rng = np.random.default_rng(0)
    for init in model.graph.initializer:
        value = numpy_helper.to_array(init)
        if value.dtype == np.float32 and value.ndim == 2:
            init.CopyFrom(numpy_helper.from_array(
                rng.normal(0, 1, value.shape).astype(np.float32), init.name))
    onnx.save(model, str(out / "model.onnx"))
    return out


@pytest.mark.parametrize("which", ["exported_causal", "untrained"])
def test_extractions_always_validate(which, request):
    decoder = Decoder(request.getfixturevalue(which))
    for prompt in prompts("extract", range(48, 56)):
        c = decoder.complete(prompt, Extract(BOUNDED), max_new_tokens=64)
        assert not c.truncated and c.token_ids[-1] == decoder.end_id
        jsonschema.validate(json.loads(c.message["content"]), BOUNDED)
        assert len(c.logprobs) == len(c.token_ids) == c.new_tokens
        assert all(lp <= 0 for lp in c.logprobs) and 0 < c.confidence <= 1


@pytest.mark.parametrize("which", ["exported_causal", "untrained"])
def test_agent_calls_validate_against_their_tool(which, request):
    decoder = Decoder(request.getfixturevalue(which))
    params = {t["name"]: t["parameters"] for t in TOOLS}
    calls = 0
    for prompt in prompts("agent", range(48, 54)):
        c = decoder.complete(prompt, Agent(TOOLS), max_new_tokens=64)
        for call in c.message.get("tool_calls") or ():
            jsonschema.validate(json.loads(call["function"]["arguments"]),
                                params[call["function"]["name"]])
            calls += 1
        if not c.truncated:  # every call opened was closed and parsed
            assert c.text.count(CALL_OPEN) == len(c.message.get("tool_calls") or ())
    if which == "exported_causal":
        assert calls >= 3  # the trained student calls tools on the first turn of each trace


# Real tool schemas: the keywords users paste (pattern, format, bounds, $ref) on the fixture tools.
RICH_EXTRACT = {"type": "object", "properties": {
    "order_id": {"type": "string", "pattern": "^A[0-9]{2}$"},
    "issue": {"oneOf": [{"const": "late"}, {"const": "damaged"}, {"const": "other"}]},
    "refund": {"type": "boolean"}, "day": {"type": "string", "format": "date"},
    "amount": {"type": "number", "exclusiveMinimum": 0, "maximum": 99, "multipleOf": 0.5}},
    "required": ["order_id", "issue", "refund"]}


def sampled(decoder: Decoder, prompt: str, mode, rng, max_new_tokens: int = 64) -> str:
    """Decode by sampling from the model's masked distribution (temperature 1), not greedily:
    validity must not hang on the argmax."""
    guide = decoder.guide(mode)
    ids = decoder.encode(prompt)
    logits, cache = decoder.graph.step(ids, 0, decoder.graph.empty_cache())
    out = []
    for _ in range(max_new_tokens):
        token = guide.forced()
        if token is None:
            scores = np.where(guide.mask()[:logits.size], logits.astype(np.float64), -np.inf)
            p = np.exp(scores - scores.max())
            token = int(rng.choice(p.size, p=p / p.sum()))
        guide.advance(token)
        if token == decoder.end_id:
            return decoder.tokenizer.decode(out, skip_special_tokens=False)
        out.append(token)
        logits, cache = decoder.graph.step([token], len(ids) + len(out) - 1, cache)
    return None  # ran out of tokens


@pytest.mark.parametrize("which", ["exported_causal", "untrained"])
def test_sampled_answers_validate_against_real_schemas(which, request):
    decoder = Decoder(request.getfixturevalue(which))
    rng = np.random.default_rng(0)
    params = {t["name"]: t["parameters"] for t in RICH_TOOLS}
    finished = calls = 0
    for prompt in prompts("extract", range(48, 54)):
        text = sampled(decoder, prompt, Extract(RICH_EXTRACT), rng)
        if text is not None:
            finished += 1
            jsonschema.validate(json.loads(text), RICH_EXTRACT)
    for prompt in prompts("agent", range(48, 52)):
        for choice in ("auto", "required"):
            text = sampled(decoder, prompt, Agent(RICH_TOOLS, choice), rng)
            message = CHAT.parse(text or "")
            for call in message.get("tool_calls") or ():
                jsonschema.validate(json.loads(call["function"]["arguments"]),
                                    params[call["function"]["name"]])
                calls += 1
            if text is not None:
                finished += 1
                assert text.count(CALL_OPEN) == len(message.get("tool_calls") or ())
    assert finished >= 4 and (calls >= 1 or which == "untrained")


def test_trained_student_answers_the_fixtures(exported_causal):
    decoder = Decoder(exported_causal)
    c = decoder.complete(prompts("extract", [49])[0], Extract(EXTRACT_SCHEMA), 64)
    assert set(json.loads(c.message["content"])) == {"order_id", "issue", "refund"}
    first_turn = prompts("agent", [49])[0]
    c = decoder.complete(first_turn, Agent(TOOLS), 64)
    assert c.message["tool_calls"][0]["function"]["name"] in {"get_order", "cancel_order"}


def test_unconstrained_mode_returns_what_the_model_says(untrained):
    decoder = Decoder(untrained)
    prompt = prompts("extract", [50])[0]
    free = decoder.complete(prompt, Extract(EXTRACT_SCHEMA), 20, constrain=False)
    ids = decoder.encode(prompt)
    plain = decoder.generate(ids, None, 20, constrain=False)
    assert free.token_ids == plain.token_ids  # the mode is ignored
    logits, _ = decoder.graph.step(ids, 0, decoder.graph.empty_cache())
    assert free.token_ids[0] == int(np.argmax(logits))
    with pytest.raises(ValueError):  # random weights do not write this schema's JSON
        jsonschema.validate(json.loads(free.text), EXTRACT_SCHEMA)


def test_kv_cache_steps_match_a_full_recompute(exported_causal):
    decoder = Decoder(exported_causal)
    ids = decoder.encode(prompts("agent", [50])[0])
    c = decoder.generate(ids, None, 12, constrain=False)
    full, _ = decoder.graph.step(ids + c.token_ids[:-1], 0, decoder.graph.empty_cache())
    assert int(np.argmax(full)) == c.token_ids[-1]


def test_a_warmed_system_turn_changes_no_answer(exported_causal):
    """warm() caches the shared prompt start; prompts that begin with it prefill only the rest
    and decode exactly as a full prefill does."""
    cold, warm = Decoder(exported_causal), Decoder(exported_causal)
    spec = causal_spec("agent")
    system = CHAT.system_text(spec.description, spec_tools(spec))
    assert warm.warm(CHAT.render(CHAT.prepare([], system, []))) > 0
    for prompt in prompts("agent", [50, 51]):
        a = cold.complete(prompt, Agent(TOOLS), 24)
        b = warm.complete(prompt, Agent(TOOLS), 24)
        assert b.token_ids == a.token_ids and a.cached_prefix == 0 < b.cached_prefix
        assert b.first_token_seconds > 0
    assert warm.complete("unrelated", None, 4, constrain=False).cached_prefix == 0


def test_running_out_of_tokens_inside_a_value_is_reported(exported_causal):
    decoder = Decoder(exported_causal)
    c = decoder.complete(prompts("extract", [50])[0], Extract(EXTRACT_SCHEMA), max_new_tokens=4)
    assert c.truncated and c.new_tokens == 4 and decoder.end_id not in c.token_ids
    with pytest.raises(ValueError):
        json.loads(c.message["content"])


def test_constraints_are_built_once_per_schema(exported_causal):
    decoder = Decoder(exported_causal)
    first = decoder.constraint(EXTRACT_SCHEMA)
    assert decoder.constraint(json.loads(json.dumps(EXTRACT_SCHEMA))) is first
    assert decoder.constraint({"type": "string"}).vocab is first.vocab
    assert first.vocab.size == decoder.spec.vocab_size


def test_tokens_per_second(exported_causal):
    """Throughput of fp32 and int8 on the tiny model (printed with -s; the report cites it)."""
    rates = {}
    for name in ("model.fp32.onnx", "model.onnx"):
        decoder = Decoder(exported_causal, threads=1, model=name)
        ids = decoder.encode(prompts("agent", [50])[0])
        done = [decoder.generate(ids, None, 48, constrain=False) for _ in range(3)]
        rates[name] = max(c.tokens_per_second for c in done)
    print("tokens/s", rates)
    assert all(rate > 0 for rate in rates.values())


def test_decoder_json_round_trip_and_format_check(exported_causal, tmp_path):
    spec = generation.DecoderSpec.load(exported_causal / "decoder.json")
    (tmp_path / "decoder.json").write_text(json.dumps(spec.to_dict()))
    assert generation.DecoderSpec.load(tmp_path / "decoder.json") == spec
    (tmp_path / "decoder.json").write_text(json.dumps({**spec.to_dict(), "format": 99}))
    with pytest.raises(ValueError, match="re-export"):
        generation.DecoderSpec.load(tmp_path / "decoder.json")


def test_generation_imports_no_torch(exported_causal):
    code = (
        "import sys, json\n"
        "from distill_compiler.runtime.decoder import Decoder, Extract\n"
        f"d = Decoder({str(exported_causal)!r})\n"
        f"c = d.complete({prompts('extract', [50])[0]!r}, Extract({EXTRACT_SCHEMA!r}), 64)\n"
        "json.loads(c.message['content'])\n"
        "heavy = [m for m in ('torch', 'transformers', 'litellm') if m in sys.modules]\n"
        "assert not heavy, heavy\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
