"""teacher.deployments through litellm's Router, over real sockets: load spread over the
deployments of a model with their own keys and concurrency, a failing deployment skipped, a
fallback model's answers cached apart, and cache entries shared by every deployment of a
model, through the client, the cost estimate and a compile."""

from __future__ import annotations

import asyncio
import sqlite3

import pytest
from cli_runner import cli
from teacher_server import (
    FakeTeacher,  # tests/ is on sys.path (conftest.py lives there)
)

from distill_compiler.spec.load import parse_spec
from distill_compiler.spec.models import Spec, keyed_values
from distill_compiler.spec.models import TeacherSpec as TeacherConfig
from distill_compiler.stages import generate
from distill_compiler.teacher import client as teacher_mod
from distill_compiler.teacher.cache import RequestCache
from distill_compiler.teacher.client import Request, Teacher
from distill_compiler.teacher.estimate import DryTeacher, StandIn, price_of

SYSTEM = "Labels:\n- billing: money\n- refund: back\n- out_of_scope: none"
KEYWORDS = {"billing": ["charge"], "refund": ["refund"]}


@pytest.fixture(autouse=True)
def fast_backoff(monkeypatch):
    monkeypatch.setattr(teacher_mod, "BACKOFF_BASE_S", 0.01)


@pytest.fixture
def servers():
    with FakeTeacher(KEYWORDS) as a, FakeTeacher(KEYWORDS) as b, FakeTeacher(KEYWORDS) as c:
        yield a, b, c


def ask(text: str) -> Request:
    return Request([{"role": "system", "content": SYSTEM}, {"role": "user", "content": text}],
                   temperature=0.0, max_tokens=8)


def teacher(tmp_path, deployments, env=None, **config) -> Teacher:
    cfg = TeacherConfig(deployments=deployments, **{"max_retries": 2, "timeout_s": 5, **config})
    return Teacher(cfg, RequestCache.at(tmp_path), env=env or {})


def complete_all(t: Teacher, texts) -> list:
    async def go():
        return await asyncio.gather(*(t.complete(ask(text)) for text in texts))
    return asyncio.run(go())


def cached_models(tmp_path) -> list[str]:
    db = sqlite3.connect(tmp_path / "teacher.sqlite")
    return sorted(row[0] for row in db.execute("SELECT model FROM responses"))


def test_load_is_spread_with_each_deployments_key_and_concurrency(servers, tmp_path):
    a, b, _ = servers
    a.latency = b.latency = 0.05
    t = teacher(tmp_path, [
        {"model": "openai/x", "api_base": a.api_base, "api_key_env": "KEY_A", "max_concurrency": 2},
        {"model": "openai/x", "api_base": b.api_base, "api_key_env": "KEY_B", "max_concurrency": 3}],
        env={"KEY_A": "sk-a", "KEY_B": "sk-b"}, max_concurrency=16)
    replies = complete_all(t, [f"refund order {i}" for i in range(24)])
    assert [r.content for r in replies] == ["refund"] * 24
    assert a.hits + b.hits == 24 and a.hits > 0 and b.hits > 0
    assert a.max_in_flight <= 2 and b.max_in_flight <= 3
    assert set(a.authorizations) == {"Bearer sk-a"} and set(b.authorizations) == {"Bearer sk-b"}
    assert t.usage.requests == 24 and {r.model for r in replies} == {"openai/x"}


def test_a_failing_deployment_is_skipped_for_another_of_the_same_model(servers, tmp_path):
    a, b, c = servers
    a.broken = True  # every request it gets answers 500
    t = teacher(tmp_path, [{"model": "openai/x", "api_base": a.api_base},
                           {"model": "openai/x", "api_base": b.api_base},
                           {"model": "openai/y", "api_base": c.api_base}])
    replies = complete_all(t, [f"charge {i}" for i in range(8)])
    assert [r.content for r in replies] == ["billing"] * 8
    assert b.hits == 8 and c.hits == 0  # the fallback model was never needed
    assert t.usage.requests == 8 and cached_models(tmp_path) == ["openai/x"] * 8


def test_a_fallback_models_answers_are_cached_apart_and_reused_by_a_rerun(servers, tmp_path):
    a, b, c = servers
    a.broken = True
    both = [{"model": "openai/x", "api_base": a.api_base},
            {"model": "openai/y", "api_base": c.api_base}]
    (reply,) = complete_all(teacher(tmp_path, both), ["refund please"])
    assert reply.model == "openai/y" and c.hits == 1
    assert reply.key == ask("refund please").key("openai/y", None)
    assert cached_models(tmp_path) == ["openai/y"]

    # A rerun with the same models pays nothing, whichever deployment is up.
    a.broken = False
    again = teacher(tmp_path, both)
    (cached,) = complete_all(again, ["refund please"])
    assert cached.cached and cached.model == "openai/y" and again.usage.requests == 0
    assert a.hits == 1 and c.hits == 1

    # A teacher without openai/y does not take its answer for openai/x's.
    only_x = teacher(tmp_path, [{"model": "openai/x", "api_base": b.api_base}])
    (fresh,) = complete_all(only_x, ["refund please"])
    assert not fresh.cached and fresh.model == "openai/x" and b.hits == 1
    assert cached_models(tmp_path) == ["openai/x", "openai/y"]
    # With both cached, the first model's answer is the one used.
    (first,) = complete_all(teacher(tmp_path, both), ["refund please"])
    assert first.cached and first.model == "openai/x"


def test_every_deployment_of_a_model_finds_what_another_answered(servers, tmp_path):
    a, b, _ = servers
    complete_all(teacher(tmp_path, [{"model": "openai/x", "api_base": a.api_base}]),
                 ["charge 1", "refund 2"])
    moved = teacher(tmp_path, [{"model": "azure/x-east", "serves": "openai/x",
                                "api_base": b.api_base}])
    replies = complete_all(moved, ["charge 1", "refund 2"])
    assert all(r.cached for r in replies) and b.hits == 0 and moved.usage.requests == 0


def test_the_router_gives_up_with_the_teachers_error_when_every_deployment_fails(servers,
                                                                                  tmp_path):
    a, b, _ = servers
    a.broken = b.broken = True
    t = teacher(tmp_path, [{"model": "openai/x", "api_base": a.api_base},
                           {"model": "openai/y", "api_base": b.api_base}], max_retries=1)
    with pytest.raises(teacher_mod.StageError, match="failed after 2 attempts"):
        complete_all(t, ["refund"])
    assert len(RequestCache.at(tmp_path)) == 0


def test_the_estimate_prices_the_first_model_by_its_deployments_string():
    config = TeacherConfig(deployments=[
        {"model": "openai/gpt-4o-mini", "serves": "house-teacher", "api_base": "http://h/v1"},
        {"model": "openai/gpt-4o", "api_base": "http://g/v1"}])
    dry = DryTeacher.for_teacher(config, None, lambda request: StandIn("billing"))
    asyncio.run(dry.complete(ask("charge")))
    estimate = dry.estimate()
    assert estimate.model == "house-teacher" and estimate.requests == 1
    assert estimate.price == price_of("openai/gpt-4o-mini") != price_of("openai/gpt-4o")


SPEC = """
name: shop
task: classify
intents:
  - {name: billing, description: Charges and invoices., examples: ["charged twice"]}
  - {name: refund, description: Money back.}
teacher:
  max_retries: 1
  timeout_s: 5
  deployments:
{deployments}
data: {per_intent: 10, registers: [formal]}
"""


def spec_with(path, *deployments: str):
    path.write_text(SPEC.replace("{deployments}", "\n".join(f"    - {d}" for d in deployments)))
    return path


def test_a_compile_over_deployments_is_repaid_by_none_after_they_change(servers, tmp_path):
    a, b, _ = servers
    path = spec_with(tmp_path / "spec.yaml",
                     f"{{model: openai/gpt-4o-mini, api_base: '{a.api_base}', rpm: 600}}",
                     f"{{model: openai/gpt-4o-mini, api_base: '{b.api_base}', rpm: 600}}")
    dirs = ["--cache", str(tmp_path / "cache"), "-o", str(tmp_path / "build")]
    estimate = generate.estimate(parse_spec(path.read_text()), tmp_path, tmp_path / "cache")
    assert estimate.requests == 2 + 21 and estimate.usd > 0  # 2 generations, 20 + 1 seed labels
    assert cli("compile", str(path), *dirs, "--until", "generate") == 0
    assert a.hits + b.hits == estimate.requests

    # Another endpoint for the same model: the stage reruns, the teacher is paid nothing.
    spec_with(path, f"{{model: openai/gpt-4o-mini, api_base: '{b.api_base}', max_concurrency: 2}}")
    again = generate.estimate(parse_spec(path.read_text()), tmp_path, tmp_path / "cache")
    assert again.requests == 0 and again.cached == estimate.requests
    paid = a.hits + b.hits
    assert cli("compile", str(path), *dirs, "--until", "generate") == 0
    assert a.hits + b.hits == paid


def test_how_fast_a_deployment_is_driven_is_not_part_of_any_stage_key():
    def keyed(deployment: dict) -> dict:
        spec = Spec(name="s", task="classify", teacher={"deployments": [deployment]})
        return keyed_values(spec, ("teacher",))
    base = keyed({"model": "openai/x"})
    assert keyed({"model": "openai/x", "rpm": 60, "tpm": 9000, "max_concurrency": 2}) == base
    assert keyed({"model": "openai/y"}) != base
    # A spec without deployments keys as it did before they existed.
    assert "deployments" not in keyed_values(Spec(name="s", task="classify"), ("teacher",))["teacher"]
