"""The cost before it is spent: `distill plan` counts the teacher requests a compile would
send (those not in the per-request cache), their tokens and dollars, and `distill compile`
stops before paying more than teacher.confirm_over_usd unless --yes."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from cli_runner import cli
from teacher_server import (
    FakeTeacher,  # tests/ is on sys.path (conftest.py lives there)
)

from distill_compiler.spec.load import parse_spec
from distill_compiler.stages import generate
from distill_compiler.teacher import client as teacher_mod
from distill_compiler.teacher.client import AnswerKeys, Request
from distill_compiler.teacher.estimate import DryTeacher, StandIn, over_limit

KEYWORDS = {"billing": ["charge"], "refund": ["refund"], "legal_advice": ["lawyer"]}

# 20 per intent over 2 registers: 4 generation batches; the refusal: 2 probe batches and
# 2 look-alike batches (5 look-alikes); 66 inputs to label (40 + 20 + 5 + 1 seed).
SPEC = """
name: shop-router
task: classify
description: Routes messages sent to a shop's support desk.
intents:
  - name: billing
    description: Charges, invoices and payment methods.
    examples: ["why was I charged twice"]
  - name: refund
    description: Money back for a returned or cancelled order.
refusals:
  - name: legal_advice
    description: Requests for legal advice.
    response: "I can't help with legal questions."
teacher:
  model: {model}
  api_base: {api_base}
  max_retries: 0
  timeout_s: 5
{extra}
data:
  per_intent: 20
  registers: [formal, terse]
"""
GENERATION, LABELS = 8, 66


@pytest.fixture(autouse=True)
def fast_backoff(monkeypatch):
    monkeypatch.setattr(teacher_mod, "BACKOFF_BASE_S", 0.01)


@pytest.fixture
def fake():
    with FakeTeacher(KEYWORDS) as server:
        yield server


def write_spec(tmp_path: Path, fake, model: str = "openai/gpt-4o-mini", extra: str = "",
               per_intent: int = 20) -> Path:
    path = tmp_path / "spec.yaml"
    text = SPEC.format(model=model, api_base=fake.api_base, extra=extra)
    path.write_text(text.replace("per_intent: 20", f"per_intent: {per_intent}"))
    return path


def dirs(tmp_path: Path) -> list[str]:
    return ["--cache", str(tmp_path / "cache"), "-o", str(tmp_path / "build")]


def estimate_of(path: Path, tmp_path: Path):
    spec = parse_spec(path.read_text())
    return generate.estimate(spec, tmp_path, tmp_path / "cache")


def kinds(estimate) -> dict[str, tuple[int, int]]:
    return {k.kind: (k.requests, k.cached) for k in estimate.kinds}


def test_plan_counts_the_requests_and_none_once_a_compile_filled_the_cache(fake, tmp_path,
                                                                          capsys):
    path = write_spec(tmp_path, fake)
    estimate = estimate_of(path, tmp_path)
    assert kinds(estimate) == {"label": (LABELS, 0), "generation": (GENERATION, 0)}
    assert not (tmp_path / "cache").exists()  # counting creates no cache
    assert cli("plan", path, *dirs(tmp_path)) == 0
    shown = capsys.readouterr().out
    assert f"{LABELS + GENERATION} teacher requests to send (0 cached)" in shown
    assert fake.hits == 0

    assert cli("compile", path, *dirs(tmp_path), "--until", "generate") == 0
    assert fake.hits == LABELS + GENERATION
    capsys.readouterr()
    again = estimate_of(path, tmp_path)
    assert again.requests == 0 and again.usd == 0.0
    assert kinds(again) == {"label": (0, LABELS), "generation": (0, GENERATION)}
    assert fake.hits == LABELS + GENERATION


def test_more_examples_count_only_the_new_requests_at_the_cached_answers_length(fake, tmp_path):
    assert cli("compile", write_spec(tmp_path, fake), *dirs(tmp_path), "--until", "generate") == 0
    more = estimate_of(write_spec(tmp_path, fake, per_intent=30), tmp_path)
    # 10 more per intent and refusal, 2 more look-alikes: each register's second batch is new
    # for the intents and the refusal probes (batches of 10, 15 per register).
    assert kinds(more)["generation"] == (6, GENERATION)
    labels = next(k for k in more.kinds if k.kind == "label")
    assert labels.requests == 10 * 3 + 3
    # The fake teacher's answers are 8 completion tokens each.
    assert labels.output_basis == f"mean of {LABELS} cached answers"
    assert labels.output_tokens == 8 * labels.requests


def test_hard_negatives_for_a_found_pair_are_counted_and_then_sent(fake, tmp_path,
                                                                    tiny_encoder_dir):
    # Two intents, none named confusable: the one pair there is is found, and gets 4 hard
    # negatives (2 each way, one per register): 4 more generation batches, 4 more labels.
    path = write_spec(tmp_path, fake)
    path.write_text(path.read_text().replace("registers: [formal, terse]", (
        "registers: [formal, terse]\n  hard_negatives: 4\n  confusable_pairs: 1\n"
        f"  embedder: '{tiny_encoder_dir}'")))
    assert kinds(estimate_of(path, tmp_path)) == {"label": (LABELS + 4, 0),
                                                   "generation": (GENERATION + 4, 0)}
    assert cli("compile", path, *dirs(tmp_path), "--until", "generate") == 0
    assert fake.hits == LABELS + 4 + GENERATION + 4


def test_dollars_are_tokens_times_the_cost_maps_price(fake, tmp_path):
    import litellm

    estimate = estimate_of(write_spec(tmp_path, fake), tmp_path)
    price = litellm.model_cost["gpt-4o-mini"]
    assert estimate.input_tokens > 0 and estimate.output_tokens > 0
    assert estimate.usd == pytest.approx(estimate.input_tokens * price["input_cost_per_token"]
                                         + estimate.output_tokens * price["output_cost_per_token"])


def test_input_tokens_are_the_rendered_messages_counted_for_the_model():
    import litellm

    messages = [{"role": "system", "content": "Label the message."},
                {"role": "user", "content": "why was I charged twice this month?"}]
    dry = DryTeacher(AnswerKeys(("openai/gpt-4o-mini",), None), None,
                     lambda request: StandIn("billing"))
    asyncio.run(dry.complete(Request(messages, max_tokens=16, kind="label")))
    asyncio.run(dry.complete(Request(messages, max_tokens=16, kind="label")))  # paid once
    (count,) = dry.estimate().kinds
    assert (count.requests, count.cached) == (1, 1)
    assert count.input_tokens == litellm.token_counter(model="openai/gpt-4o-mini",
                                                       messages=messages)
    assert count.output_tokens == litellm.token_counter(model="openai/gpt-4o-mini",
                                                        text="billing")


def test_the_kind_of_a_request_is_not_part_of_its_cache_key():
    messages = [{"role": "user", "content": "hi"}]
    assert (Request(messages, kind="label").key("openai/x", None)
            == Request(messages, kind="generation").key("openai/x", None))


def test_a_model_missing_from_the_cost_map_has_an_unknown_price(fake, tmp_path):
    estimate = estimate_of(write_spec(tmp_path, fake, model="openai/not-a-priced-model"),
                           tmp_path)
    assert estimate.requests == LABELS + GENERATION and estimate.usd is None
    assert "unknown price (openai/not-a-priced-model is not in litellm's cost map)" \
        in estimate.describe()
    assert "unknown price" in over_limit(estimate, 100.0)


def test_compile_over_the_limit_stops_before_any_request_and_yes_proceeds(fake, tmp_path,
                                                                           capsys):
    path = write_spec(tmp_path, fake, extra="  confirm_over_usd: 0.000001")
    assert cli("compile", path, *dirs(tmp_path), "--until", "generate") == 1
    message = capsys.readouterr().err
    assert fake.hits == 0
    line = next(l for l in message.splitlines() if "confirm_over_usd" in l)
    assert f"({LABELS + GENERATION} requests" in line
    assert "over teacher.confirm_over_usd $1e-06" in line
    assert "rerun with --yes or raise teacher.confirm_over_usd" in line
    assert cli("compile", path, *dirs(tmp_path), "--until", "generate", "--yes") == 0
    assert fake.hits == LABELS + GENERATION
    # Everything is cached now: the estimate is $0 and the limit no longer stops a compile.
    assert cli("compile", path, *dirs(tmp_path), "--until", "generate", "--force",
               "generate") == 0
    assert fake.hits == LABELS + GENERATION


def test_compile_within_the_limit_proceeds(fake, tmp_path):
    path = write_spec(tmp_path, fake, extra="  confirm_over_usd: 5")
    assert cli("compile", path, *dirs(tmp_path), "--until", "generate") == 0
    assert fake.hits == LABELS + GENERATION


def test_unknown_price_with_a_limit_stops_and_yes_proceeds(fake, tmp_path, capsys):
    path = write_spec(tmp_path, fake, model="openai/not-a-priced-model",
                      extra="  confirm_over_usd: 5")
    assert cli("compile", path, *dirs(tmp_path), "--until", "generate") == 1
    assert "unknown price" in capsys.readouterr().err and fake.hits == 0
    assert cli("plan", path, *dirs(tmp_path)) == 0
    assert "teacher.confirm_over_usd $5: compile asks for --yes" in capsys.readouterr().out
    assert cli("compile", path, *dirs(tmp_path), "--until", "generate", "--yes") == 0
    assert fake.hits == LABELS + GENERATION
