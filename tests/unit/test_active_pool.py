"""Unlabeled pools (`teacher.pool`): which requests get paid for, round by round, and that a
rerun or a larger budget pays only for what it adds. The fake teacher sits at the API boundary;
the sentence encoder is the tiny fixture one."""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import numpy as np
import pytest
from teacher_server import (
    FakeTeacher,  # tests/ is on sys.path (conftest.py lives there)
)

from distill_compiler.data import selection
from distill_compiler.data.active import RoundModel
from distill_compiler.errors import SpecError, StageError
from distill_compiler.pipeline import SpecView, StageContext
from distill_compiler.spec.load import parse_spec
from distill_compiler.stages import generate
from distill_compiler.teacher import client as teacher_mod

KEYWORDS = {"billing": ["charge"], "refund": ["refund"], "legal_advice": ["lawyer"]}
THINGS = ("phone", "laptop", "garden hose", "order", "tablet", "camera", "bike", "printer",
          "kettle", "lamp")
POOL_TEXTS = ([f"I was charged twice for my {t}" for t in THINGS]
              + [f"please refund the {t} I sent back" for t in THINGS]
              + [f"should I call a lawyer about the {t}" for t in THINGS]
              + [f"what time does the {t} shop open" for t in THINGS])

SPEC = """
name: shop-router
task: classify
description: Routes messages sent to a shop's support desk.
intents:
  - name: billing
    description: Charges, invoices and payment methods.
  - name: refund
    description: Money back for a returned or cancelled order.
refusals:
  - name: legal_advice
    description: Requests for legal advice.
    response: "I can't help with legal questions."
teacher:
  model: openai/x
  api_base: {api_base}
  max_retries: 0
  timeout_s: 5
  pool: [{pool}]
{teacher_extra}
data:
  label_budget: {budget}
  round_size: 4
  embedder: {embedder}
{data_extra}
"""


@pytest.fixture(autouse=True)
def fast_backoff(monkeypatch):
    monkeypatch.setattr(teacher_mod, "BACKOFF_BASE_S", 0.01)


@pytest.fixture
def fake():
    with FakeTeacher(KEYWORDS) as server:
        yield server


@pytest.fixture
def pool_file(tmp_path) -> Path:
    path = tmp_path / "traffic.txt"
    path.write_text("\n".join(POOL_TEXTS) + "\n")
    return path


def spec_for(fake, pool: Path, embedder: Path, budget: int = 12, teacher_extra: str = "",
             data_extra: str = ""):
    return parse_spec(SPEC.format(api_base=fake.api_base, pool=pool.name, budget=budget,
                                  embedder=embedder, teacher_extra=teacher_extra,
                                  data_extra=data_extra))


def run_generate(spec, tmp_path: Path):
    out = tmp_path / f"generate-{uuid.uuid4().hex[:6]}"
    out.mkdir()
    ctx = StageContext("generate", SpecView(spec, generate.KEYED_ON), tmp_path, {}, out,
                       tmp_path / "cache")
    summary = generate.run(ctx)
    records = [json.loads(line) for line in (out / "examples.jsonl").read_text().splitlines()]
    return summary, records, json.loads((out / "stats.json").read_text())


# --------------------------------------------------------------------------- selection

def unit(rows) -> np.ndarray:
    x = np.asarray(rows, dtype=np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_seed_takes_one_request_per_cluster_largest_first():
    rng = np.random.default_rng(0)
    centres = unit(np.eye(3, 8) * 5 + 1)
    sizes = (12, 6, 3)
    x = unit(np.concatenate([np.repeat(c[None], n, 0) + rng.normal(0, 0.02, (n, 8))
                             for c, n in zip(centres, sizes, strict=True)]))
    picks = selection.seed_picks(x, 3, seed=0)
    clusters = [int(np.argmax(x[i] @ centres.T)) for i in picks]
    assert clusters == [0, 1, 2]


def test_k_center_takes_the_farthest_request_from_what_is_labelled():
    x = unit([[1, 0.0], [0.99, 0.14], [0, 1], [-1, 0.1]])
    assert selection.k_center(x, unit([[1, 0.05]]), 2) == [3, 2]
    assert selection.k_center(x, np.zeros((0, 2), np.float32), 1) == [0]


def test_picks_are_prefix_stable_so_a_larger_budget_only_adds():
    rng = np.random.default_rng(1)
    x = unit(rng.normal(size=(60, 6)))
    probs = rng.dirichlet(np.ones(4), size=60)
    labelled = unit(rng.normal(size=(5, 6)))
    assert (selection.uncertain_picks(x, probs, labelled, 3, round_size=6)
            == selection.uncertain_picks(x, probs, labelled, 6, round_size=6)[:3])
    assert selection.seed_picks(x, 6, 0)[:2] == selection.seed_picks(x, 6, 0)[:2]
    assert selection.random_picks(60, 4, 0) == selection.random_picks(60, 9, 0)[:4]


def test_uncertain_picks_come_from_the_smallest_margins():
    x = unit(np.random.default_rng(2).normal(size=(40, 5)))
    probs = np.tile([0.9, 0.05, 0.05], (40, 1))
    probs[[7, 19, 31]] = [0.4, 0.35, 0.25]
    picks = selection.uncertain_picks(x, probs, np.zeros((0, 5), np.float32), 3, round_size=1)
    assert sorted(picks) == [7, 19, 31]  # the only candidates at 5 per pick: 3 + 2 sure ones


def test_round_model_is_calibrated_and_separates_clear_classes():
    rng = np.random.default_rng(3)
    centres = unit(np.eye(3, 16) * 4 + 0.5)
    x = unit(np.concatenate([np.repeat(c[None], 30, 0) + rng.normal(0, 0.05, (30, 16))
                             for c in centres]))
    y = [i // 30 for i in range(90)]
    model = RoundModel.fit(x, y, n_classes=4, seed=0)
    probs = model.probs(x)
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, rtol=1e-5)
    assert model.heldout_agreement == 1.0
    assert (probs.argmax(axis=1) == np.array(y)).all()


# --------------------------------------------------------------------------- the stage

def test_the_budget_is_spent_in_rounds_and_a_rerun_pays_nothing(fake, tmp_path, pool_file,
                                                               tiny_encoder_dir):
    spec = spec_for(fake, pool_file, tiny_encoder_dir)
    summary, records, stats = run_generate(spec, tmp_path)
    assert fake.hits == summary["teacher_requests"] == 12
    pooled = [r for r in records if r["cohort"] == "pool"]
    assert len(pooled) == 12 and len({r["input"]["message"] for r in pooled}) == 12
    assert all(r["provenance"]["pool"].startswith("traffic.txt:") for r in pooled)
    rounds = stats["pool"]["rounds"]
    assert [r["by"] for r in rounds] == ["seed", "margin+k-center", "margin+k-center"]
    assert [r["selected"] for r in rounds] == [4, 4, 4]
    assert stats["pool"]["pool"] == 40 and stats["pool"]["labelled"] == 12

    fake.reset_counts()
    again, records_again, _ = run_generate(spec, tmp_path)
    assert fake.hits == again["teacher_requests"] == 0 and again["cached_requests"] == 12
    assert records_again == records


def test_a_larger_budget_pays_only_for_the_requests_it_adds(fake, tmp_path, pool_file,
                                                           tiny_encoder_dir):
    run_generate(spec_for(fake, pool_file, tiny_encoder_dir, budget=8), tmp_path)
    fake.reset_counts()
    summary, records, _ = run_generate(spec_for(fake, pool_file, tiny_encoder_dir, budget=14),
                                       tmp_path)
    assert fake.hits == summary["teacher_requests"] == 6 and summary["cached_requests"] == 8
    assert len([r for r in records if r["cohort"] == "pool"]) == 14


def test_random_selection_is_the_seeded_control(fake, tmp_path, pool_file, tiny_encoder_dir):
    spec = spec_for(fake, pool_file, tiny_encoder_dir, budget=10, data_extra="  selection: random")
    summary, _, stats = run_generate(spec, tmp_path)
    assert summary["teacher_requests"] == 10
    assert [r["by"] for r in stats["pool"]["rounds"]] == ["random"] * 3
    assert [r["selected"] for r in stats["pool"]["rounds"]] == [4, 4, 2]


def test_the_teachers_request_limit_ends_selection_with_what_was_labelled(fake, tmp_path,
                                                                         pool_file,
                                                                         tiny_encoder_dir):
    spec = spec_for(fake, pool_file, tiny_encoder_dir, teacher_extra="  max_requests: 6")
    summary, records, stats = run_generate(spec, tmp_path)
    assert fake.hits == 6
    assert len([r for r in records if r["cohort"] == "pool"]) == 6
    assert stats["pool"]["stopped"] == "teacher.max_requests (6) reached"
    fake.reset_counts()
    # The limit lifted, the rerun pays only for the other six.
    summary, _, _ = run_generate(spec_for(fake, pool_file, tiny_encoder_dir), tmp_path)
    assert fake.hits == 6 and summary["cached_requests"] == 6


def test_logged_requests_and_repeats_are_not_paid_for_again(fake, tmp_path, tiny_encoder_dir):
    pool = tmp_path / "traffic.csv"
    pool.write_text("text\n" + "\n".join(POOL_TEXTS[:8] + POOL_TEXTS[:2]) + "\n")
    log = tmp_path / "labelled.csv"
    log.write_text(f"text,label\n{POOL_TEXTS[0]},billing\n{POOL_TEXTS[10]},refund\n")
    spec = spec_for(fake, pool, tiny_encoder_dir, budget=20,
                    teacher_extra="  logs: [labelled.csv]")
    summary, _, stats = run_generate(spec, tmp_path)
    assert stats["pool"]["pool"] == 7  # 8 distinct, one of them already logged
    assert summary["teacher_requests"] == 7
    # Two labelled classes from the log: no seed round, the model chooses from the start.
    assert stats["pool"]["rounds"][0]["by"] == "margin+k-center"


def test_chat_log_pools_read_the_user_message_and_objects_are_refused(fake, tmp_path,
                                                                      tiny_encoder_dir):
    pool = tmp_path / "traffic.jsonl"
    pool.write_text(json.dumps({"messages": [{"role": "system", "content": "be brief"},
                                             {"role": "user", "content": POOL_TEXTS[0]}]}) + "\n"
                    + json.dumps({"input": POOL_TEXTS[11]}) + "\n")
    _, records, _ = run_generate(spec_for(fake, pool, tiny_encoder_dir), tmp_path)
    assert sorted(r["input"]["message"] for r in records) == sorted([POOL_TEXTS[0], POOL_TEXTS[11]])
    pool.write_text(json.dumps({"input": {"message": "hi"}}) + "\n")
    with pytest.raises(StageError, match=r"traffic.jsonl:1: a pool request must be text"):
        run_generate(spec_for(fake, pool, tiny_encoder_dir), tmp_path)


def test_plan_counts_the_pool_requests_and_none_after_the_compile(fake, tmp_path, pool_file,
                                                                  tiny_encoder_dir):
    spec = spec_for(fake, pool_file, tiny_encoder_dir)
    before = generate.estimate(spec, tmp_path, tmp_path / "cache")
    assert fake.hits == 0
    assert before.requests == 12
    run_generate(spec, tmp_path)
    after = generate.estimate(spec, tmp_path, tmp_path / "cache")
    assert after.requests == 0 and after.cached == 12


def test_a_pool_needs_a_live_teacher_and_a_task_with_single_requests(tmp_path):
    base = "name: s\ntask: {task}\n{extra}teacher:\n  {model}pool: [traffic.txt]\n"
    with pytest.raises(SpecError, match="labelling the request pool asks for a live teacher"):
        parse_spec(base.format(task="classify", model="", extra=(
            "intents:\n  - {name: a, description: a}\n  - {name: b, description: b}\n")))
    with pytest.raises(SpecError, match="an agent spec cannot label a request pool"):
        parse_spec(base.format(task="agent", model="model: openai/x\n  ", extra=(
            "tools:\n  - {name: t, description: t}\n")))


# --------------------------------------------------------------------------- failure rounds

ROUNDS_SPEC = """
name: shop-router
task: classify
description: Routes messages sent to a shop's support desk.
intents:
  - name: billing
    description: Charges, invoices and payment methods.
  - name: refund
    description: Money back for a returned or cancelled order.
teacher:
  model: openai/x
  api_base: {api_base}
  max_retries: 0
  timeout_s: 5
  logs: [labelled.csv]
data:
  rounds: 3
  round_size: 40
  min_gain: {min_gain}
  embedder: {embedder}
"""


@pytest.fixture
def ambiguous_log(tmp_path) -> Path:
    """Near-identical messages labelled billing and refund alternately: no model can fit
    them all, so every round finds failures to work on."""
    rows = [f"question about order number {i}," + ("billing" if i % 2 else "refund")
            for i in range(140)]
    path = tmp_path / "labelled.csv"
    path.write_text("text,label\n" + "\n".join(rows) + "\n")
    return path


def test_a_failure_round_asks_around_each_cluster_and_a_rerun_pays_nothing(
        fake, tmp_path, ambiguous_log, tiny_encoder_dir):
    from distill_compiler.stages.generate import BATCH

    spec = parse_spec(ROUNDS_SPEC.format(api_base=fake.api_base, min_gain=1.0,
                                         embedder=tiny_encoder_dir))
    summary, records, stats = run_generate(spec, tmp_path)
    rounds = stats["failure_rounds"]
    # A gain of 1.0 is out of reach: one round, then the stop rule.
    assert len(rounds["rounds"]) == 1 and rounds["stopped"].startswith("gain ")
    first = rounds["rounds"][0]
    assert first["failures"] > 0 and 1 <= len(first["clusters"]) <= 40 // (2 * BATCH)
    # Per cluster: a batch like its failures and a batch of near-misses, each then labelled.
    assert fake.hits == summary["teacher_requests"] == len(first["clusters"]) * 2 * (1 + BATCH)
    added = [r for r in records if r["cohort"] == "failure_round"]
    assert len(added) == first["added"] == sum(c["added"] for c in first["clusters"])
    assert {r["provenance"]["round"] for r in added} == {0}
    assert all(c["target"] != c["confused_with"] for c in first["clusters"])
    fake.reset_counts()
    again, records_again, _ = run_generate(spec, tmp_path)
    assert fake.hits == again["teacher_requests"] == 0 and records_again == records


def test_failure_rounds_are_for_classify_specs():
    with pytest.raises(SpecError, match="failure rounds refit a label model"):
        parse_spec("name: s\ntask: extract\noutput:\n  schema: {type: object}\n"
                   "teacher:\n  model: openai/x\ndata:\n  rounds: 2\n")
