"""The teacher client (retries, concurrency, budget, cache) over real sockets, and label maths."""

from __future__ import annotations

import asyncio
import math
import sqlite3
import time

import pytest
from teacher_server import (
    FakeTeacher,  # tests/ is on sys.path (conftest.py lives there)
)

from distill_compiler.errors import StageError
from distill_compiler.spec.models import TeacherSpec as TeacherConfig
from distill_compiler.teacher import client as teacher_mod
from distill_compiler.teacher.cache import RequestCache, request_key
from distill_compiler.teacher.client import (
    BadReply,
    Request,
    Teacher,
    json_schema_format,
    parse_json,
)
from distill_compiler.teacher.labels import (
    label_distribution,
    label_of,
    vote_distribution,
)

LABELS = ("billing", "refund", "out_of_scope")
SYSTEM = "Labels:\n- billing: money\n- refund: back\n- out_of_scope: none"


@pytest.fixture(autouse=True)
def fast_backoff(monkeypatch):
    monkeypatch.setattr(teacher_mod, "BACKOFF_BASE_S", 0.01)


@pytest.fixture
def fake():
    with FakeTeacher({"billing": ["charge"], "refund": ["refund"]}) as server:
        yield server


def client(fake, tmp_path, env=None, **config) -> Teacher:
    cfg = TeacherConfig(model="openai/x", api_base=fake.api_base, **config)
    return Teacher(cfg, RequestCache.at(tmp_path), env=env or {})


def ask(text: str, **kw) -> Request:
    return Request([{"role": "system", "content": SYSTEM}, {"role": "user", "content": text}], **kw)


def run(coro):
    return asyncio.run(coro)


def test_label_answer_with_logprobs(fake, tmp_path):
    reply = run(client(fake, tmp_path).complete(ask("please refund me", logprobs=True, max_tokens=8)))
    assert reply.content == "refund" and not reply.cached
    assert fake.bodies[0]["logprobs"] is True and fake.bodies[0]["top_logprobs"] == 20
    soft = label_distribution(reply.logprobs, LABELS, "refund")
    # 0.8 on refund, 0.15 split over billing/out, 0.05 on "Sorry" dropped and renormalised.
    assert soft == pytest.approx({"refund": 0.8 / 0.95, "billing": 0.075 / 0.95,
                                  "out_of_scope": 0.075 / 0.95}, abs=1e-5)


@pytest.mark.parametrize("fault", ["429", "500", "timeout"])
def test_transient_errors_are_retried(fake, tmp_path, fault):
    fake.timeout_sleep = 1.0
    fake.inject(fault, fault)
    teacher = client(fake, tmp_path, timeout_s=0.3, max_retries=2)
    reply = run(teacher.complete(ask("refund")))
    assert reply.content == "refund" and fake.hits == 3 and teacher.usage.requests == 1


def test_retry_after_is_honoured(fake, tmp_path):
    fake.retry_after = "0.4"
    fake.inject("429")
    started = time.perf_counter()
    run(client(fake, tmp_path).complete(ask("refund")))
    assert time.perf_counter() - started >= 0.4 and fake.hits == 2


def test_retries_exhausted_is_a_stage_error_naming_the_cause(fake, tmp_path):
    fake.broken = True
    with pytest.raises(StageError, match=r"failed after 3 attempts: InternalServerError 500") as err:
        run(client(fake, tmp_path, max_retries=2).complete(ask("refund")))
    assert "cached" in err.value.hint and fake.hits == 3


def test_rerun_is_answered_from_the_cache(fake, tmp_path):
    run(client(fake, tmp_path).complete(ask("refund", sample=0)))
    again = client(fake, tmp_path)
    reply = run(again.complete(ask("refund", sample=0)))
    assert reply.cached and reply.content == "refund" and fake.hits == 1
    assert again.usage.requests == 0 and again.usage.cached == 1
    run(again.complete(ask("refund", sample=1)))  # another draw is another request
    assert fake.hits == 2


def test_concurrency_is_bounded_and_identical_requests_are_paid_once(fake, tmp_path):
    fake.latency = 0.05
    teacher = client(fake, tmp_path, max_concurrency=3)

    async def many():
        distinct = [teacher.complete(ask(f"refund {i}")) for i in range(9)]
        same = [teacher.complete(ask("charge")) for _ in range(4)]
        return await asyncio.gather(*distinct, *same)

    replies = run(many())
    assert fake.hits == 10 and fake.max_in_flight == 3
    assert sum(r.cached for r in replies) == 3


def test_max_requests_is_a_hard_cap(fake, tmp_path):
    teacher = client(fake, tmp_path, max_requests=2)
    run(teacher.complete(ask("a")))
    run(teacher.complete(ask("b")))
    with pytest.raises(StageError, match=r"max_requests \(2\) reached: spent \$0.0000 on 2 requests"):
        run(teacher.complete(ask("c")))
    assert fake.hits == 2


def test_api_key_is_sent_but_never_stored(fake, tmp_path):
    secret = "sk-test-DO-NOT-STORE-123"
    teacher = client(fake, tmp_path, env={"MY_KEY": secret}, api_key_env="MY_KEY")
    run(teacher.complete(ask("refund")))
    assert fake.authorizations == [f"Bearer {secret}"]
    for path in tmp_path.iterdir():
        assert secret.encode() not in path.read_bytes()
    with pytest.raises(StageError, match=r"\$MISSING_KEY, which is not set"):
        client(fake, tmp_path, env={}, api_key_env="MISSING_KEY")


def test_cache_is_sqlite_in_wal_mode_and_committed_per_request(fake, tmp_path):
    teacher = client(fake, tmp_path)
    run(teacher.complete(ask("refund")))
    # A second connection sees the row at once: it was committed, not held in a transaction.
    db = sqlite3.connect(tmp_path / "teacher.sqlite")
    assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert db.execute("SELECT COUNT(*) FROM responses").fetchone()[0] == 1


def test_request_key_covers_what_decides_the_answer():
    messages = [{"role": "user", "content": "hi"}]
    base = request_key("openai/x", None, messages, {"temperature": 0}, 0)
    assert base == request_key("openai/x", None, messages, {"temperature": 0}, 0)
    assert len({base, request_key("openai/y", None, messages, {"temperature": 0}, 0),
                request_key("openai/x", "http://h/v1", messages, {"temperature": 0}, 0),
                request_key("openai/x", None, messages, {"temperature": 0.7}, 0),
                request_key("openai/x", None, messages, {"temperature": 0}, 1)}) == 5


# --------------------------------------------------------------------------- answers -> values

def test_parse_json_validates_even_structured_output():
    schema = {"type": "object", "required": ["items"], "properties": {"items": {"type": "array"}}}
    assert parse_json('```json\n{"items": [1]}\n```', schema) == {"items": [1]}
    with pytest.raises(BadReply) as bad:
        parse_json("{nope", schema)
    assert bad.value.reason == "malformed_json"
    with pytest.raises(BadReply) as bad:
        parse_json('{"items": 3}', schema)
    assert bad.value.reason == "schema_invalid"
    assert json_schema_format("x", schema)["json_schema"] == {"name": "x", "schema": schema}


def test_label_of_accepts_casing_spacing_and_trailing_text():
    labels = ("password_reset", "billing", "out_of_scope")
    assert label_of(" Password reset.", labels) == "password_reset"
    assert label_of("billing\nbecause it is", labels) == "billing"
    assert label_of("no idea", labels) is None


def test_label_distribution_splits_shared_first_tokens_and_follows_the_greedy_path():
    labels = ("card_arrival", "card_linking", "refund")
    tokens = [
        {"token": "card", "logprob": math.log(0.7), "top": [["card", math.log(0.7)], ["refund", math.log(0.3)]]},
        {"token": "_arrival", "logprob": math.log(0.6),
         "top": [["_arrival", math.log(0.6)], ["_linking", math.log(0.4)]]},
    ]
    soft = label_distribution(tokens, labels, "card_arrival")
    assert soft == pytest.approx({"card_arrival": 0.42, "card_linking": 0.28, "refund": 0.3})


def test_vote_distribution_ignores_answers_that_name_no_label():
    assert vote_distribution(["refund", "refund", None, "billing"], LABELS) == pytest.approx(
        {"billing": 1 / 3, "refund": 2 / 3})
