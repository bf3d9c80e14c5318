"""teacher.batch against the fake teacher's batch endpoints (files, batches, retrieve, output
content) over real sockets: answers land in the per-request cache at the batch price, failed
lines are asked again in the next batch, an interrupted poll resumes the same batch, and the
plan's estimate uses the batch price. The kill -9 drill is in test_crash_drills.py."""

from __future__ import annotations

import asyncio
import json
import sqlite3

import pytest
from cli_runner import cli
from teacher_server import (
    FakeTeacher,  # tests/ is on sys.path (conftest.py lives there)
)

from distill_compiler.errors import StageError
from distill_compiler.spec.load import parse_spec
from distill_compiler.spec.models import TeacherSpec as TeacherConfig
from distill_compiler.stages import generate
from distill_compiler.teacher import client as teacher_mod
from distill_compiler.teacher.batch import BatchTeacher
from distill_compiler.teacher.cache import RequestCache
from distill_compiler.teacher.client import Request
from distill_compiler.teacher.estimate import price_of

SYSTEM = "Labels:\n- billing: money\n- refund: back\n- out_of_scope: none"
MODEL = "openai/gpt-4o-mini"  # in litellm's cost map, with batch prices


@pytest.fixture(autouse=True)
def fast_backoff(monkeypatch):
    monkeypatch.setattr(teacher_mod, "BACKOFF_BASE_S", 0.01)


@pytest.fixture
def fake():
    with FakeTeacher({"billing": ["charge"], "refund": ["refund"]}) as server:
        yield server


def batch_teacher(fake, tmp_path, **config) -> BatchTeacher:
    cfg = TeacherConfig(model=MODEL, api_base=fake.api_base, batch=True,
                        **{"batch_poll_s": 0.02, "max_retries": 2, **config})
    return BatchTeacher(cfg, RequestCache.at(tmp_path), env={})


def ask(text: str) -> Request:
    return Request([{"role": "system", "content": SYSTEM}, {"role": "user", "content": text}],
                   temperature=0.0, max_tokens=8)


TEXTS = [f"{'refund' if i % 2 else 'charge'} number {i}" for i in range(6)]
EXPECTED = ["refund" if i % 2 else "billing" for i in range(6)]


def complete_all(teacher, texts=TEXTS) -> list:
    async def go():
        return await asyncio.gather(*(teacher.complete(ask(t)) for t in texts))
    return asyncio.run(go())


def open_batches(tmp_path) -> list:
    return sqlite3.connect(tmp_path / "teacher.sqlite").execute(
        "SELECT batch_id FROM batches").fetchall()


def test_requests_asked_together_go_in_one_batch_at_the_batch_price(fake, tmp_path):
    teacher = batch_teacher(fake, tmp_path)
    replies = complete_all(teacher)
    assert [r.content for r in replies] == EXPECTED
    assert fake.batch.created == 1 and fake.batch.paid == 6 and fake.hits == 0
    # The fake's usage: 8 completion tokens, prompt tokens = words of the messages.
    price = price_of(MODEL, batch=True)
    assert price.input_per_token == pytest.approx(price_of(MODEL).input_per_token / 2)
    expected = sum(r.prompt_tokens * price.input_per_token + 8 * price.output_per_token
                   for r in replies)
    assert teacher.usage.cost_usd == pytest.approx(expected) and teacher.usage.requests == 6
    assert open_batches(tmp_path) == []  # closed once its answers were cached

    # The answers are in the normal per-request cache: a rerun (batch or not) pays nothing.
    again = batch_teacher(fake, tmp_path)
    assert all(r.cached for r in complete_all(again)) and fake.batch.created == 1
    live = teacher_mod.Teacher(TeacherConfig(model=MODEL, api_base=fake.api_base),
                               RequestCache.at(tmp_path), env={})
    assert all(r.cached for r in complete_all(live)) and fake.hits == 0


def test_lines_that_fail_in_a_batch_are_asked_again_in_the_next(fake, tmp_path):
    fake.batch.inject("ok", "500", "ok", "429", "drop", "ok")
    teacher = batch_teacher(fake, tmp_path)
    replies = complete_all(teacher)
    assert [r.content for r in replies] == EXPECTED
    assert fake.batch.created == 2 and fake.batch.paid == 6
    assert max(fake.batch.paid_prompts.values()) == 1  # nothing paid twice, nothing lost
    second = fake.batch.files[fake.batch.batches["batch_2"]["input_file_id"]]
    assert len(second.splitlines()) == 3  # the 500, the 429 and the dropped line
    assert teacher.usage.requests == 6 and len(RequestCache.at(tmp_path)) == 6


def test_a_batch_that_fails_as_a_whole_is_sent_again(fake, tmp_path):
    fake.batch.fail_next = "expired"
    replies = complete_all(batch_teacher(fake, tmp_path))
    assert [r.content for r in replies] == EXPECTED
    assert fake.batch.created == 2 and fake.batch.paid == 6


def test_a_line_refused_for_good_stops_the_build_and_keeps_the_others(fake, tmp_path):
    fake.batch.inject("ok", "400")
    teacher = batch_teacher(fake, tmp_path)
    with pytest.raises(StageError, match="refused a request: LineFailed 400"):
        complete_all(teacher, TEXTS[:2])
    assert len(RequestCache.at(tmp_path)) == 1 and fake.batch.created == 1


def test_lines_failing_past_max_retries_stop_the_build(fake, tmp_path):
    fake.batch.inject("500", "500")
    teacher = batch_teacher(fake, tmp_path, max_retries=1)
    with pytest.raises(StageError, match="failed after 2 attempts"):
        complete_all(teacher, TEXTS[:1])
    assert fake.batch.created == 2 and fake.batch.paid == 0


def test_an_interrupted_poll_resumes_the_same_batch_and_pays_nothing_twice(fake, tmp_path):
    fake.batch.hold = True  # the batch runs as long as the test likes

    async def interrupted():
        teacher = batch_teacher(fake, tmp_path)
        tasks = [asyncio.ensure_future(teacher.complete(ask(t))) for t in TEXTS]
        while not (fake.batch.created and fake.batch.retrieves >= 2):
            await asyncio.sleep(0.01)
        for task in tasks:  # what Ctrl-C does to the generate stage
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    asyncio.run(interrupted())
    assert [row[0] for row in open_batches(tmp_path)] == ["batch_1"]  # kept before polling
    assert fake.batch.paid == 0 and len(RequestCache.at(tmp_path)) == 0

    fake.batch.hold = False
    replies = complete_all(batch_teacher(fake, tmp_path))
    assert [r.content for r in replies] == EXPECTED
    assert fake.batch.created == 1 and fake.batch.paid == 6  # polled batch_1, sent nothing
    assert open_batches(tmp_path) == []


SPEC = """
name: shop
task: classify
intents:
  - {name: billing, description: Charges and invoices., examples: ["charged twice"]}
  - {name: refund, description: Money back.}
teacher: {model: openai/gpt-4o-mini, api_base: "API", batch: true, batch_poll_s: 0.02,
          max_retries: 1}
data: {per_intent: 10, registers: [formal]}
"""


def test_a_compile_sends_two_batches_and_its_plan_uses_the_batch_price(fake, tmp_path):
    path = tmp_path / "spec.yaml"
    path.write_text(SPEC.replace("API", fake.api_base))
    spec = parse_spec(path.read_text())
    estimate = generate.estimate(spec, tmp_path, tmp_path / "cache")
    assert estimate.price == price_of(MODEL, batch=True) and estimate.batch
    assert "batch price" in estimate.describe()
    live = generate.estimate(parse_spec(path.read_text().replace("batch: true", "batch: false")),
                             tmp_path, tmp_path / "cache")
    assert estimate.usd == pytest.approx(live.usd / 2)  # gpt-4o-mini's batch price is half

    dirs = ["--cache", str(tmp_path / "cache"), "-o", str(tmp_path / "build")]
    assert cli("compile", str(path), *dirs, "--until", "generate") == 0
    # The generation prompts and the seed's label, then the labels of what they returned.
    assert fake.batch.created == 2 and fake.batch.paid == estimate.requests == 23
    summary = json.loads((tmp_path / "build" / "distill.lock").read_text())["generate"]["summary"]
    assert summary["teacher_requests"] == 23 and summary["cost_usd"] > 0
    # The batch answers are the per-request cache's: turning batch off pays nothing.
    path.write_text(path.read_text().replace("batch: true", "batch: false"))
    assert cli("compile", str(path), *dirs, "--until", "generate") == 0
    assert fake.hits == 0 and fake.batch.created == 2


def test_with_deployments_batches_go_to_the_first_and_lines_that_keep_failing_go_live(tmp_path):
    from distill_compiler.spec.models import DeploymentSpec

    with FakeTeacher({"billing": ["charge"], "refund": ["refund"]}) as first, \
            FakeTeacher({"billing": ["charge"], "refund": ["refund"]}) as second:
        cfg = TeacherConfig(deployments=(DeploymentSpec(model=MODEL, api_base=first.api_base),
                                         DeploymentSpec(model=MODEL, api_base=second.api_base)),
                            batch=True, batch_poll_s=0.02, max_retries=1)
        teacher = BatchTeacher(cfg, RequestCache.at(tmp_path), env={})
        # Line 0 fails in both batches it is sent in (the first and its retry).
        first.batch.inject("500", "ok", "ok", "ok", "ok", "ok", "500")
        replies = complete_all(teacher)
        assert [r.content for r in replies] == EXPECTED
        assert first.batch.created == 2 and first.batch.paid == 5
        # The one line no batch answered went live, through the router, to either deployment.
        assert first.hits + second.hits == 1
