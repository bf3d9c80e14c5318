"""generate against a fake OpenAI-compatible teacher on a real socket, reached through litellm."""

from __future__ import annotations

import csv
import json
import uuid
from pathlib import Path

import pytest
from teacher_server import (
    FakeTeacher,  # tests/ is on sys.path (conftest.py lives there)
)

from distill_compiler.artifacts import Artifact
from distill_compiler.errors import StageError
from distill_compiler.pipeline import SpecView, StageContext
from distill_compiler.spec.load import parse_spec
from distill_compiler.spec.models import Spec
from distill_compiler.stages import curate, generate
from distill_compiler.teacher import client as teacher_mod

REPO = Path(__file__).resolve().parents[2]
BANKING77 = Path("/work/shared/datasets/banking77/banking_data/train.csv")
KEYWORDS = {"billing": ["charge"], "refund": ["refund"], "legal_advice": ["lawyer"]}

CLASSIFY = """
name: shop-router
task: classify
description: Routes messages sent to a shop's support desk.
intents:
  - name: billing
    description: Charges, invoices and payment methods.
    examples: ["why was I charged twice"]
    confusable_with: [refund]
  - name: refund
    description: Money back for a returned or cancelled order.
refusals:
  - name: legal_advice
    description: Requests for legal advice.
    response: "I can't help with legal questions."
teacher:
  model: openai/x
  api_base: {api_base}
  max_retries: 3
  timeout_s: 5
  max_concurrency: 8
data:
  per_intent: 20
  registers: [formal, terse]
"""


@pytest.fixture(autouse=True)
def fast_backoff(monkeypatch):
    monkeypatch.setattr(teacher_mod, "BACKOFF_BASE_S", 0.01)


@pytest.fixture
def fake():
    with FakeTeacher(KEYWORDS) as server:
        yield server


def spec_of(text: str, **fmt):
    return parse_spec(text.format(**fmt))


def context(module, spec, tmp_path: Path, inputs=None) -> StageContext:
    out = tmp_path / f"{module.__name__.rsplit('.', 1)[-1]}-{uuid.uuid4().hex[:6]}"
    out.mkdir()
    return StageContext(module.__name__.rsplit(".", 1)[-1], SpecView(spec, module.KEYED_ON),
                        tmp_path, inputs or {}, out, tmp_path / "cache")


def run_generate(spec, tmp_path):
    ctx = context(generate, spec, tmp_path)
    return ctx, generate.run(ctx)


def examples(ctx) -> list[dict]:
    return [json.loads(line) for line in (ctx.out / "examples.jsonl").read_text().splitlines()]


def set_field(text: str, section: str, line: str) -> str:
    return text.replace(f"{section}:\n", f"{section}:\n  {line}\n", 1)


# --------------------------------------------------------------------------- classify

def test_classify_generation_labels_every_input_with_soft_labels(fake, tmp_path):
    spec = spec_of(CLASSIFY, api_base=fake.api_base)
    ctx, summary = run_generate(spec, tmp_path)
    records = examples(ctx)
    # 20 per intent and per refusal, 5 refusal look-alikes, 1 seed.
    assert summary["examples"] == len(records) == 20 + 20 + 20 + 5 + 1
    assert summary["teacher_requests"] == fake.hits == 66 + 8  # 66 labels + 8 generation batches
    assert summary["cached_requests"] == 0
    by_cohort = json.loads((ctx.out / "stats.json").read_text())["by_cohort"]
    assert by_cohort == {"paraphrase:formal": 20, "paraphrase:terse": 20, "refusal_probe": 20,
                         "refusal_lookalike": 5, "seed": 1}
    for record in records:
        assert record["source"] == "teacher" and record["provenance"]["model"] == "openai/x"
        assert abs(sum(record["soft"].values()) - 1) < 1e-4
        assert max(record["soft"], key=record["soft"].get) == record["target"]
    paraphrased = [r for r in records if r["cohort"].startswith("paraphrase")]
    assert all(r["target"] == r["provenance"]["intended"] for r in paraphrased)


def test_rerun_makes_no_requests_and_writes_the_same_examples(fake, tmp_path):
    spec = spec_of(CLASSIFY, api_base=fake.api_base)
    first, summary = run_generate(spec, tmp_path)
    fake.reset_counts()
    second, again = run_generate(spec, tmp_path)
    assert fake.hits == 0
    assert again["teacher_requests"] == 0 and again["cached_requests"] == summary["teacher_requests"]
    assert (first.out / "examples.jsonl").read_bytes() == (second.out / "examples.jsonl").read_bytes()


def test_interrupted_run_resumes_with_only_the_missing_requests(fake, tmp_path):
    capped = spec_of(set_field(CLASSIFY, "teacher", "max_requests: 30"), api_base=fake.api_base)
    with pytest.raises(StageError) as stop:
        run_generate(capped, tmp_path)
    assert "teacher.max_requests (30) reached: spent $0.0000 on 30 requests" in stop.value.message
    assert "rerun" in stop.value.hint
    assert fake.hits == 30
    fake.reset_counts()
    _, summary = run_generate(spec_of(CLASSIFY, api_base=fake.api_base), tmp_path)
    assert fake.hits == summary["teacher_requests"] == 74 - 30
    assert summary["cached_requests"] == 30


def test_provider_outage_fails_the_stage_and_a_rerun_finishes_the_work(fake, tmp_path):
    text = CLASSIFY.replace("max_retries: 3", "max_retries: 0").replace(
        "max_concurrency: 8", "max_concurrency: 1")
    spec = spec_of(text, api_base=fake.api_base)
    fake.inject("500")
    with pytest.raises(StageError, match="failed after 1 attempts: InternalServerError 500"):
        run_generate(spec, tmp_path)
    assert fake.hits == 1
    fake.reset_counts()
    _, summary = run_generate(spec, tmp_path)
    assert summary["teacher_requests"] == fake.hits == 74 and summary["examples"] == 66


def test_more_examples_per_intent_pays_only_for_the_new_ones(fake, tmp_path):
    fifty = spec_of(CLASSIFY.replace("per_intent: 20", "per_intent: 50"), api_base=fake.api_base)
    _, before = run_generate(fifty, tmp_path)
    fake.reset_counts()
    sixty = spec_of(CLASSIFY.replace("per_intent: 20", "per_intent: 60"), api_base=fake.api_base)
    _, after = run_generate(sixty, tmp_path)
    new = after["examples"] - before["examples"]
    assert new == 10 + 10 + 10 + 2  # billing, refund, refusal probes, look-alikes (13 -> 15)
    # Batches of 10 per register already covered 25 per register: no new generation request.
    assert fake.hits == after["teacher_requests"] == new
    assert not any(b.get("response_format") for b in fake.bodies)


def test_budget_stops_at_its_limit_and_says_what_was_spent(fake, tmp_path):
    # A priced model name makes litellm.completion_cost report real costs for the fake's usage.
    text = set_field(CLASSIFY, "teacher", "budget_usd: 0.0001").replace(
        "model: openai/x", "model: openai/gpt-4o-mini").replace("max_concurrency: 8", "max_concurrency: 1")
    with pytest.raises(StageError) as stop:
        run_generate(spec_of(text, api_base=fake.api_base), tmp_path)
    message = stop.value.message
    assert message.startswith("teacher.budget_usd ($0.0001) reached: spent $0.0001")
    spent = float(message.split("spent $")[1].split()[0])
    requests = int(message.split(" on ")[1].split()[0])
    assert 0.0001 <= spent < 0.0002 and requests == fake.hits < 74


def test_bad_answers_are_counted_and_dropped_not_fatal(fake, tmp_path):
    spec = spec_of(CLASSIFY.replace("max_concurrency: 8", "max_concurrency: 1"), api_base=fake.api_base)
    # With one request at a time the order is fixed: the seed's label, then generation batches.
    fake.inject("invalid", "malformed", "invalid")
    ctx, summary = run_generate(spec, tmp_path)
    stats = json.loads((ctx.out / "stats.json").read_text())
    assert stats["rejected"] == {"generation_malformed_json": 1, "generation_schema_invalid": 1}
    assert summary["examples"] == 66 - 20  # two batches of ten lost
    seed = next(r for r in examples(ctx) if r["cohort"] == "seed")
    assert seed["target"] == "definitely_not_a_label" and seed["soft"] is None
    curated = context(curate, spec, tmp_path, {"generate": Artifact(ctx.out, "examples", "d", {})})
    result = curate.run(curated)
    assert result["dropped"]["label"] == 1


def test_sampled_soft_labels_vote(fake, tmp_path):
    text = set_field(CLASSIFY, "teacher", "soft_labels: samples").replace(
        "model: openai/x", "model: openai/x\n  samples: 3")
    ctx, summary = run_generate(spec_of(text, api_base=fake.api_base), tmp_path)
    assert summary["teacher_requests"] == 66 * 3 + 8
    assert all(r["soft"] == {r["target"]: 1.0} for r in examples(ctx))  # a deterministic fake agrees


def test_template_override_changes_prompts_and_keys_the_stage(fake, tmp_path):
    folder = tmp_path / "prompts"
    folder.mkdir()
    (folder / "label.j2").write_text("Pick one.\n{% for l in labels %}\n- {{ l.name }}: {{ l.description }}\n"
                                     "{% endfor %}\nJust the label.")
    spec = spec_of(set_field(CLASSIFY, "teacher", "templates: prompts"), api_base=fake.api_base)
    files = generate.external_files(SpecView(spec, generate.KEYED_ON), tmp_path)
    assert files == {"teacher.templates/label.j2": folder / "label.j2"}
    run_generate(spec, tmp_path)
    labelling = [b for b in fake.bodies if not b.get("response_format")]
    assert labelling and all(b["messages"][0]["content"].startswith("Pick one.") for b in labelling)


# A third intent beside the named pair billing~refund, so that two pairs are left to find.
CONFUSABLE = CLASSIFY.replace("refusals:", """  - name: delivery
    description: Where a parcel is and when it arrives.
refusals:""").replace("per_intent: 20", """per_intent: 0
  hard_negatives: 4
  confusable_pairs: {pairs}
  embedder: '{embedder}'""")


def generation_bodies(fake) -> list[dict]:
    return [b for b in fake.bodies
            if (b.get("response_format") or {}).get("json_schema", {}).get("name") == "generated_inputs"]


def test_found_confusable_pairs_get_hard_negatives_beside_the_named_ones(fake, tmp_path,
                                                                         tiny_encoder_dir):
    named = spec_of(CONFUSABLE, api_base=fake.api_base, embedder=tiny_encoder_dir, pairs=0)
    ctx, _ = run_generate(named, tmp_path)
    # 4 per pair: 2 each way, one per register.
    assert json.loads((ctx.out / "stats.json").read_text())["confusable_pairs"] == [
        {"pair": ["billing", "refund"], "source": "named", "examples": 4}]
    assert len(generation_bodies(fake)) == 4
    fake.reset_counts()

    # Both pairs left are found (which is nearer depends on the untrained encoder, so the
    # order is not asserted); the named pair's requests are the same and come from the cache.
    found = spec_of(CONFUSABLE, api_base=fake.api_base, embedder=tiny_encoder_dir, pairs=2)
    ctx, summary = run_generate(found, tmp_path)
    assert len(generation_bodies(fake)) == 8 and summary["cached_requests"] == 4 + 4 + 1
    rows = json.loads((ctx.out / "stats.json").read_text())["confusable_pairs"]
    assert rows[0] == {"pair": ["billing", "refund"], "source": "named", "examples": 4}
    assert sorted(r["pair"] for r in rows[1:]) == [["billing", "delivery"], ["delivery", "refund"]]
    assert all(r["source"] == "found" and r["examples"] == 4 and -1 <= r["cosine"] <= 1
               for r in rows[1:])
    hard = [r for r in examples(ctx) if r["cohort"] == "hard_negative"]
    assert len(hard) == 12
    assert all(r["provenance"]["pair"][0] == r["provenance"]["intended"] for r in hard)
    prompts = ["\n".join(m["content"] for m in b["messages"]) for b in generation_bodies(fake)]
    assert sum('belong to "delivery"' in p for p in prompts) == 4  # 2 each way, found pairs


# --------------------------------------------------------------------------- log replay

def test_replays_chat_logs_without_a_live_teacher(tmp_path):
    lines = [
        {"messages": [{"role": "system", "content": "route"}, {"role": "user", "content": "refund my order"}],
         "response": {"role": "assistant", "content": "refund"},
         "logprobs": {"content": [{"token": "refund", "logprob": -0.1, "top_logprobs": [
             {"token": "refund", "logprob": -0.1}, {"token": "billing", "logprob": -2.4}]}]}},
        {"request": {"messages": [{"role": "user", "content": "charged twice"}]},
         "response": {"model": "gpt-4o", "choices": [{"message": {"role": "assistant", "content": "billing"}}]}},
        {"input": "talk to a lawyer", "label": "legal_advice"},
        {"input": {"message": "hello there"}, "label": "out_of_scope"},
    ]
    (tmp_path / "log.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    text = CLASSIFY.split("teacher:")[0] + "teacher:\n  logs: [log.jsonl]\n"
    ctx, summary = run_generate(parse_spec(text), tmp_path)
    assert summary == {"teacher_requests": 0, "cached_requests": 0, "cost_usd": 0.0, "examples": 4}
    first, second, third, fourth = examples(ctx)
    assert first["input"] == {"message": "refund my order"} and first["target"] == "refund"
    assert first["soft"]["refund"] > 0.85 and set(first["soft"]) == {"refund", "billing"}
    assert second["target"] == "billing" and second["provenance"]["model"] == "gpt-4o"
    assert third["input"] == {"message": "talk to a lawyer"} and fourth["target"] == "out_of_scope"
    assert [r["provenance"]["log"] for r in (first, fourth)] == ["log.jsonl:1", "log.jsonl:4"]
    assert generate.external_files(SpecView(parse_spec(text), generate.KEYED_ON), tmp_path) == {
        "teacher.logs[0]": tmp_path / "log.jsonl"}


def test_csv_log_with_text_category_header(tmp_path):
    with open(tmp_path / "rows.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerows([["text", "category"], ["I was charged twice", "billing"],
                          ["where is my money back", "refund"]])
    text = CLASSIFY.split("teacher:")[0] + "teacher:\n  logs: [rows.csv]\n"
    ctx, summary = run_generate(parse_spec(text), tmp_path)
    assert [(r["input"]["message"], r["target"], r["provenance"]["log"]) for r in examples(ctx)] == [
        ("I was charged twice", "billing", "rows.csv:2"), ("where is my money back", "refund", "rows.csv:3")]


@pytest.mark.skipif(not BANKING77.is_file(), reason="banking77 is not on this machine")
def test_banking77_csv_labels_the_spec_lacks_stop_generate_with_counts(tmp_path):
    """Rows are never dropped silently: a spec with a few intents over banking77's 77 labels
    is told which labels match none, how many rows each, and the closest intent."""
    text = CLASSIFY.split("teacher:")[0] + f"teacher:\n  logs: ['{BANKING77}']\n"
    with pytest.raises(StageError) as caught:
        run_generate(parse_spec(text), tmp_path)
    message = caught.value.render()
    assert "log label(s) in" in message and "rows match no intent" in message
    assert "'request_refund': 169 rows (did you mean 'refund'?)" in message
    assert "log_labels" in caught.value.hint


def test_log_labels_map_a_log_s_own_spelling_onto_intents(tmp_path):
    with open(tmp_path / "rows.csv", "w", newline="") as f:
        csv.writer(f).writerows([["text", "category"], ["where is my refund", "Refund_not_showing_up"],
                                 ["payment came back", "reverted_card_payment?"],
                                 ["charged twice", "Billing"], ["hello", "greeting"],
                                 ["hi", "greeting"], ["refund?", "refund_pending"]])
    text = CLASSIFY.split("teacher:")[0] + "teacher:\n  logs: [rows.csv]\n"
    spec = parse_spec(text)
    intents = [i.model_dump(by_alias=True) for i in spec.intents]
    for intent in intents:
        if intent["name"] == "refund":
            intent["log_labels"] = ["Refund_not_showing_up", "refund_pending"]
    data = spec.model_dump(by_alias=True)
    with pytest.raises(StageError, match=r"2 log label\(s\) in 3 rows match no intent") as caught:
        run_generate(Spec.model_validate({**data, "intents": intents}), tmp_path)
    assert "'greeting': 2 rows" in str(caught.value.render())
    assert "'reverted_card_payment?': 1 row" in str(caught.value.render())
    (tmp_path / "rows.csv").write_text("text,category\nwhere is my refund,Refund_not_showing_up\n"
                                       "charged twice,Billing\nrefund?,refund_pending\n")
    ctx, _ = run_generate(Spec.model_validate({**data, "intents": intents}), tmp_path)
    assert [r["target"] for r in examples(ctx)] == ["refund", "billing", "refund"]


def test_harbor_support_log_replays(tmp_path):
    log = REPO / "examples/harbor-support/data/teacher_log.jsonl"
    example = (REPO / "examples/harbor-support/spec.yaml").read_text()
    ctx, summary = run_generate(parse_spec(example.replace("data/teacher_log.jsonl", str(log))),
                                tmp_path)
    assert summary["examples"] == 420
    assert {r["target"] for r in examples(ctx)} >= {"refund", "billing", "legal_advice", "other"}


def test_a_broken_log_line_is_reported_with_its_location(tmp_path):
    (tmp_path / "log.jsonl").write_text('{"input": "ok", "label": "refund"}\n{oops\n')
    text = CLASSIFY.split("teacher:")[0] + "teacher:\n  logs: [log.jsonl]\n"
    with pytest.raises(StageError, match=r"log.jsonl:2: not a JSON line"):
        run_generate(parse_spec(text), tmp_path)


# --------------------------------------------------------------------------- extract and agent

EXTRACT = """
name: orders
task: extract
description: Pulls order details out of customer emails.
input: {{schema: {{type: object, properties: {{message: {{type: string}}}}, required: [message]}}}}
output:
  schema:
    type: object
    properties:
      customer: {{type: string}}
      items: {{type: integer}}
    required: [customer, items]
student: {{method: sft}}
teacher:
  model: openai/x
  api_base: {api_base}
  max_concurrency: 1
data:
  per_intent: 12
  registers: [formal]
"""


def test_extract_answers_follow_the_output_schema(fake, tmp_path):
    spec = spec_of(EXTRACT, api_base=fake.api_base)
    ctx, summary = run_generate(spec, tmp_path)
    assert summary["examples"] == 12 and fake.hits == 2 + 12  # batches of 10 and 2, then answers
    answers = [b for b in fake.bodies if b["response_format"]["json_schema"]["name"] == "extraction"]
    assert len(answers) == 12
    assert answers[0]["response_format"]["json_schema"]["schema"] == spec.output.schema_
    assert all(set(r["target"]) == {"customer", "items"} for r in examples(ctx))


def test_extract_answer_that_breaks_the_schema_is_dropped_by_curate(fake, tmp_path):
    spec = spec_of(EXTRACT, api_base=fake.api_base)
    fake.inject("ok", "ok", "invalid")  # one request at a time: two batches, then the answers
    ctx, summary = run_generate(spec, tmp_path)
    assert summary["examples"] == 12
    curated = context(curate, spec, tmp_path, {"generate": Artifact(ctx.out, "examples", "d", {})})
    result = curate.run(curated)
    assert result["kept"] == 11 and result["dropped"] == {"output_schema": 1}


AGENT = """
name: delivery-agent
task: agent
description: Moves deliveries for customers.
tools:
  - name: move_delivery
    description: Move a delivery to a new date.
    parameters:
      type: object
      properties: {{order_id: {{type: string}}, date: {{type: string}}}}
      required: [order_id, date]
scenarios:
  - description: A customer wants their parcel delivered next week instead.
    tools: [move_delivery]
    turns: 2
student: {{method: sft}}
teacher:
  model: openai/x
  api_base: {api_base}
data:
  per_intent: 2
"""


def test_agent_traces_call_tools_with_simulated_results(fake, tmp_path):
    spec = spec_of(AGENT, api_base=fake.api_base)
    ctx, summary = run_generate(spec, tmp_path)
    records = examples(ctx)
    assert summary["examples"] == len(records) == 2
    roles = [m["role"] for m in records[0]["messages"]]
    assert roles == ["user", "assistant", "tool", "assistant"] * 2
    call = records[0]["messages"][1]["tool_calls"][0]["function"]
    assert call["name"] == "move_delivery" and isinstance(call["arguments"], str)
    assert set(json.loads(call["arguments"])) == {"order_id", "date"}
    curated = context(curate, spec, tmp_path, {"generate": Artifact(ctx.out, "examples", "d", {})})
    assert curate.run(curated)["dropped"] == {}


def test_agent_log_replay_keeps_the_tools_the_request_offered(tmp_path):
    call = {"id": "c1", "type": "function",
            "function": {"name": "move_delivery", "arguments": {"order_id": "A1", "date": "friday"}}}
    offered = {"request": {"messages": [{"role": "system", "content": "be nice"},
                                        {"role": "user", "content": "move A1 to friday"}],
                           "tools": [{"type": "function", "function": {"name": "move_delivery"}}]},
               "response": {"choices": [{"message": {"role": "assistant", "tool_calls": [call]}}]}}
    silent = {"messages": [{"role": "user", "content": "hi"}],
              "response": {"role": "assistant", "content": "Hello!"}}
    (tmp_path / "log.jsonl").write_text("".join(json.dumps(x) + "\n" for x in (offered, silent)))
    text = AGENT.format(api_base="x").split("scenarios:")[0] + (
        "student: {method: sft}\nteacher:\n  logs: [log.jsonl]\n")
    ctx, _ = run_generate(parse_spec(text), tmp_path)
    first, second = examples(ctx)
    assert first["input"] == {"tools": ["move_delivery"]} and second["input"] is None
    assert [m["role"] for m in first["messages"]] == ["user", "assistant"]
    assert json.loads(first["messages"][1]["tool_calls"][0]["function"]["arguments"]) == {
        "order_id": "A1", "date": "friday"}


def test_out_of_scope_probes_come_near_and_far_and_only_validate(tmp_path):
    # Keywords for no intent: the stand-in labels every probe out_of_scope, as a teacher would.
    with FakeTeacher({"legal_advice": ["lawyer"]}) as server:
        text = CLASSIFY.replace("per_intent: 20", "per_intent: 0\n  out_of_scope: 30")
        spec = spec_of(text, api_base=server.api_base)
        ctx, _ = run_generate(spec, tmp_path)
        prompts = ["\n".join(m["content"] for m in b["messages"]) for b in server.bodies
                   if (b.get("response_format") or {}).get("json_schema", {}).get("name")
                   == "generated_inputs"]
    by_cohort = json.loads((ctx.out / "stats.json").read_text())["by_cohort"]
    assert by_cohort["out_of_scope_near"] == by_cohort["out_of_scope_far"] == 15
    assert sum("about its own domain" in p for p in prompts) == 2  # one batch per register
    assert all("- billing: Charges" in p for p in prompts)

    curated = context(curate, spec, tmp_path, {"generate": Artifact(ctx.out, "examples", "d", {})})
    curate.run(curated)
    splits = {name: [json.loads(line) for line in (curated.out / f"{name}.jsonl").open()]
              for name in ("train", "val", "test")}
    probes = {name: [r for r in part if r["cohort"].startswith("out_of_scope_")]
              for name, part in splits.items()}
    assert probes["train"] == []
    for cohort in ("out_of_scope_near", "out_of_scope_far"):
        held = [len([r for r in probes[s] if r["cohort"] == cohort]) for s in ("val", "test")]
        assert held == [8, 7]  # every probe the teacher kept out of scope, half each
    # What trains as out_of_scope is the spec's own example, which the stand-in does not know.
    assert {r["cohort"] for r in splits["train"] if r["target"] == "out_of_scope"} == {"seed"}
