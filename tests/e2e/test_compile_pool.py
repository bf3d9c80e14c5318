"""A classify spec that pays its teacher only for what teaches compiles to a bundle: an unlabeled
pool (`teacher.pool`) labelled within a budget, failure rounds (`data.rounds`), through the
batch endpoint (`teacher.batch`) of the first of two deployments (`teacher.deployments`). The
fake OpenAI-compatible teachers on real sockets are the only doubles; a recompile pays nothing."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import TINY_STUDENT
from teacher_server import FakeTeacher
from tiny_models import classify_examples

from distill_compiler import runtime
from distill_compiler.pipeline import Project, build
from distill_compiler.spec.load import load_spec
from distill_compiler.teacher import client as teacher_mod

pytestmark = pytest.mark.e2e

KEYWORDS = {"billing": ["charged", "refund", "invoice", "billed", "price"],
            "password_reset": ["password", "sign in", "locked out", "login"]}


@pytest.fixture(autouse=True)
def fast_backoff(monkeypatch):
    monkeypatch.setattr(teacher_mod, "BACKOFF_BASE_S", 0.01)


def write_spec(root: Path, first: str, second: str, encoder: Path) -> Path:
    # Unlabeled traffic: the fixture's messages, answers left out.
    pool = [text for text, _ in classify_examples(40)]
    (root / "traffic.txt").write_text("\n".join(pool) + "\n")
    teacher = {"deployments": [{"model": "openai/fake", "api_base": first},
                               {"model": "openai/fake", "api_base": second}],
               "batch": True, "batch_poll_s": 0.02, "max_retries": 1, "soft_labels": "none",
               "pool": ["traffic.txt"]}
    spec = {"name": "pool-router", "task": "classify",
            "description": "Routes messages sent to a support desk.",
            "intents": [{"name": "billing", "description": "Charges, invoices, refunds."},
                        {"name": "password_reset", "description": "Cannot log in."}],
            "teacher": teacher,
            "data": {"label_budget": 72, "round_size": 24, "rounds": 1, "min_gain": 0.0,
                     "registers": ["formal"], "embedder": str(encoder),
                     "near_duplicate_threshold": 1.0},
            "student": {"base": str(encoder), **TINY_STUDENT},
            "export": {"min_parity": 0.5}}
    (root / "spec.yaml").write_text(json.dumps(spec))
    return root / "spec.yaml"


def test_pool_rounds_batch_and_deployments_compile_and_a_recompile_pays_nothing(
        tmp_path, tiny_encoder_dir):
    with FakeTeacher(KEYWORDS) as first, FakeTeacher(KEYWORDS) as second:
        spec_path = write_spec(tmp_path, first.api_base, second.api_base, tiny_encoder_dir)
        project = Project.of(load_spec(spec_path), spec_path, tmp_path / "build", tmp_path / "cache")
        result = build(project)
        stats = json.loads(next(r.artifact for r in result.runs if r.name == "generate")
                           .file("stats.json").read_text())
        assert stats["pool"]["labelled"] == 72 and len(stats["pool"]["rounds"]) == 3
        assert stats["failure_rounds"]["rounds"]  # ran (found failures or said there were none)
        # Everything went through the first deployment's batch endpoint.
        assert first.batch.created >= 2 and first.hits == second.hits == 0
        assert stats["requests"] == first.batch.paid

        bundle = runtime.load_bundle(project.bundle_dir)
        answer = bundle.predict({"message": "I was charged twice for my order"})
        assert answer["label"] in ("billing", "password_reset", "out_of_scope")

        paid = first.batch.paid
        again = build(project)
        assert all(run.cached for run in again.runs) and first.batch.paid == paid
