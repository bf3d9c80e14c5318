"""The evaluate and bundle stages on hand-made upstream artifacts around the bag-of-words model
from test_runtime, whose confidences are known, so the fitted policy can be checked exactly."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from conftest import stage_context
from test_runtime import LABELS, bag_classifier

from distill_compiler.data.records import example, write_jsonl
from distill_compiler.errors import StageError
from distill_compiler.runtime import load_bundle
from distill_compiler.runtime.classifier import softmax
from distill_compiler.spec.models import Spec, keyed_values
from distill_compiler.stages import bundle, evaluate

# (message, teacher label, gold, cohort). Confidences at T = 1: "charged twice" 0.83,
# "my login password" 0.93, "charged hmm hmm" 0.65, "hmm please help" 0.20.
VAL = [
    *[("charged twice", "billing", None, "log")] * 3,
    *[("my login password", "password_reset", None, "log")] * 3,
    ("charged hmm hmm", "password_reset", None, "hard_negative"),
    ("hmm please help", "out_of_scope", None, "out_of_scope"),
    ("help contract", "legal_advice", None, "refusal_probe"),
    ("the crash", "technical_bug", None, "log"),
    ("sue me invoice", "billing", None, "log"),
]
TEST = [
    ("charged twice", "billing", "billing", "log"),
    ("my login password", "password_reset", "password_reset", "paraphrase:terse"),
    ("charged hmm hmm", "password_reset", "password_reset", "hard_negative"),
    ("hmm please help", "out_of_scope", None, "out_of_scope"),
    ("help contract", "legal_advice", None, "refusal_probe"),
    ("the crash", "technical_bug", None, "log"),
    ("sue me invoice", "billing", None, "log"),
    ("invoice login", "billing", None, "log"),
]


def spec(**changes) -> Spec:
    return Spec.model_validate({
        "name": "bag", "task": "classify",
        "intents": [{"name": n, "description": f"{n} requests"}
                    for n in ("billing", "password_reset", "technical_bug")],
        "refusals": [{"name": "legal_advice", "description": "Legal questions.",
                      "response": "I can't help with legal questions."}],
        "escalation": {"always": ["technical_bug"], "target_accuracy": 0.95,
                       "triggers": [{"pattern": r"(?i)\bsue\b", "reason": "legal threat"}]},
        "teacher": {"model": "openai/gpt-4o-mini", "api_base": "http://teacher:8000/v1",
                    "api_key_env": "TEACHER_KEY"},
        "export": {"max_length": 16},
        **changes,
    })


def records(rows) -> list[dict]:
    return [example(input={"message": m}, target=t, gold=g, cohort=c, source="log",
                    provenance={"log": f"log.jsonl:{i}"}) for i, (m, t, g, c) in enumerate(rows)]


@pytest.fixture
def upstream(tmp_path) -> dict[str, Path]:
    """Artifact directories of generate, curate, train and export, as those stages write them."""
    dirs = {name: tmp_path / name for name in ("generate", "curate", "train", "export")}
    for d in dirs.values():
        d.mkdir()
    (dirs["generate"] / "stats.json").write_text(json.dumps(
        {"requests": 40, "cached": 0, "cost_usd": 0.08, "prompt_tokens": 1, "completion_tokens": 1,
         "by_cohort": {"log": 11}, "by_source": {"log": 11}}))
    write_jsonl(dirs["curate"] / "val.jsonl", records(VAL))
    write_jsonl(dirs["curate"] / "test.jsonl", records(TEST))
    (dirs["curate"] / "report.json").write_text(json.dumps(
        {"generated": 20, "kept": 19, "dropped": {"duplicate": {"count": 1, "examples": []}},
         "splits": {"train": 0, "val": len(VAL), "test": len(TEST)}, "per_label": {}}))
    (dirs["train"] / "train_log.json").write_text(json.dumps(
        {"params": 70, "epochs_run": 1, "best_epoch": 1, "val_agreement": 0.8,
         "versions": {"torch": "2.13.0"}}))
    bag_classifier(dirs["export"])
    (dirs["export"] / "labels.json").write_text(json.dumps(LABELS))
    (dirs["export"] / "parity.json").write_text(json.dumps(
        {"quantize": "none", "n": 11, "agreement_fp32": 1.0, "agreement_shipped": 1.0,
         "max_abs_diff_fp32": 0.0, "sizes": {"model.onnx": 1000}}))
    return dirs


def run_evaluate(upstream, tmp_path, the_spec) -> tuple[dict, Path]:
    out = tmp_path / "evaluate"
    inputs = {k: upstream[k] for k in evaluate.INPUTS}
    summary = evaluate.run(stage_context("evaluate", out, inputs, the_spec))
    return summary, out


def test_evaluate_fits_the_policy_on_the_shipped_model(upstream, tmp_path):
    summary, out = run_evaluate(upstream, tmp_path, spec())
    policy = json.loads((out / "policy.json").read_text())
    assert policy["labels"] == LABELS and policy["text_field"] == "message"
    assert policy["max_length"] == 16 and policy["always_escalate"] == ["technical_bug"]
    assert policy["triggers"] == [{"pattern": r"(?i)\bsue\b", "reason": "legal threat"}]
    # Accepting down to "charged twice" keeps every answered example right; one step lower
    # takes in the wrong "charged hmm hmm" (7/8 < 0.95). So the threshold is exactly the
    # calibrated confidence of "charged twice".
    t = policy["temperature"]
    assert policy["threshold"] == pytest.approx(softmax(np.array([3.0, 0, 0, 0, 0]), t)[0])

    predictions = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    routes = [(p["predicted"], p["route"]) for p in predictions]
    assert routes == [("billing", "student"), ("password_reset", "student"), ("billing", "teacher"),
                      ("billing", "teacher"), ("legal_advice", "refusal"),
                      ("technical_bug", "teacher"), ("billing", "teacher"), ("billing", "teacher")]

    metrics = json.loads((out / "metrics.json").read_text())
    cascade = metrics["cascade"]["test"]
    assert cascade["escalations_by_rule"] == {"always": 1, "low_confidence": 3, "trigger": 1}
    assert summary["escalation_rate"] == pytest.approx(5 / 8, abs=1e-4)
    assert summary["accepted_accuracy"] == 1.0
    assert summary["agreement"] == pytest.approx(6 / 8, abs=1e-4)
    assert summary["accuracy"] == pytest.approx(2 / 3, abs=1e-4)  # 3 gold rows, 1 wrong
    assert cascade["end_to_end_accuracy"] == 1.0
    assert cascade["cost"]["all_teacher_usd_per_1k"] == pytest.approx(2.0)
    assert cascade["cost"]["cascade_usd_per_1k"] == pytest.approx(1.25)
    assert metrics["test"]["per_cohort"]["hard_negative"] == {"n": 1, "agreement": 0.0, "accuracy": 0.0}
    assert len(metrics["calibration"]["reliability_after"]) == 15
    assert summary["latency_p50_ms"] > 0 and metrics["latency"]["runs"] == 200
    assert len(metrics["latency"]["samples_ms"]) == 200
    assert metrics["test"]["confusion"] == {
        "rows": LABELS, "columns": LABELS,
        "counts": [[3, 0, 0, 0, 0], [1, 1, 0, 0, 0], [0, 0, 1, 0, 0], [0, 0, 0, 1, 0],
                   [1, 0, 0, 0, 0]]}
    assert set(summary) == {"agreement", "accuracy", "escalation_rate", "accepted_accuracy",
                            "ece_before", "ece_after", "threshold", "latency_p50_ms",
                            "latency_p99_ms"}


def test_evaluate_unreachable_target_escalates_everything(upstream, tmp_path):
    # A teacher that calls everything out_of_scope: no student answer on validation is right.
    write_jsonl(upstream["curate"] / "val.jsonl",
                records([(m, "out_of_scope", g, c) for m, _, g, c in VAL]))
    summary, out = run_evaluate(upstream, tmp_path, spec())
    assert json.loads((out / "policy.json").read_text())["threshold"] > 1.0
    cascade = json.loads((out / "metrics.json").read_text())["cascade"]
    assert not cascade["reached"] and "no threshold reaches" in cascade["explanation"]
    # Only the refusal is still answered on test.
    assert cascade["test"]["routes"] == {"refusal": 1, "teacher": 7}


def run_bundle(upstream, tmp_path, the_spec) -> tuple[dict, Path]:
    run_evaluate(upstream, tmp_path, the_spec)
    inputs = {**upstream, "evaluate": tmp_path / "evaluate"}
    out = tmp_path / "bundle"
    return bundle.run(stage_context("bundle", out, inputs, the_spec)), out


def test_bundle_assembles_a_verified_bundle(upstream, tmp_path):
    summary, out = run_bundle(upstream, tmp_path, spec(gates={"min_teacher_agreement": 0.7,
                                                              "max_escalation_rate": 0.7}))
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["model.onnx", "tokenizer.json", "policy.json", "manifest.json", "report.json", "MODEL_CARD.md",
         "report.html"])
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["format"] == 1 and manifest["name"] == "bag" and len(manifest["spec_sha256"]) == 64
    assert set(manifest["files"]) == {"model.onnx", "tokenizer.json", "policy.json", "report.json",
                                      "MODEL_CARD.md", "report.html"}
    assert manifest["versions"]["torch"] == "2.13.0" and manifest["versions"]["onnxruntime"]
    assert manifest["created_from"]["evaluate"] == "fixture-evaluate"
    policy = json.loads((out / "policy.json").read_text())
    assert policy["teacher"] == {"model": "openai/gpt-4o-mini", "api_base": "http://teacher:8000/v1",
                                 "api_key_env": "TEACHER_KEY"}
    assert summary["gates"] == {"min_teacher_agreement": True, "max_escalation_rate": True}

    loaded = load_bundle(out)
    assert loaded.predict({"message": "charged twice"})["route"] == "student"
    assert loaded.predict({"message": "sue me"})["reason"] == "trigger: legal threat"
    card = (out / "MODEL_CARD.md").read_text()
    for heading in ("## Intended use", "## Labels", "## Data", "## Metrics", "## Cascade",
                    "## Limitations"):
        assert heading in card
    assert "| `legal_advice` | Legal questions. | refusal |" in card


def test_spec_hash_ignores_fields_that_never_change_output():
    def spec_hash(s):
        return bundle.spec_sha256(keyed_values(s, bundle.KEYED_ON))

    a = spec_hash(spec())
    assert a == spec_hash(spec(teacher={"model": "openai/gpt-4o-mini",
                                        "api_base": "http://teacher:8000/v1",
                                        "api_key_env": "TEACHER_KEY", "budget_usd": 9}))
    assert a != spec_hash(spec(export={"max_length": 32}))


def test_failing_gates_stop_the_bundle(upstream, tmp_path):
    with pytest.raises(StageError) as exc:
        run_bundle(upstream, tmp_path, spec(gates={"min_teacher_agreement": 0.9,
                                                   "max_escalation_rate": 0.2}))
    assert exc.value.message == ("gate failed: agreement 0.75 < min_teacher_agreement 0.90; "
                                 "escalation_rate 0.62 > max_escalation_rate 0.20")
    assert "gates.max_escalation_rate" in exc.value.hint
    assert not (tmp_path / "bundle" / "manifest.json").exists()


def test_evaluate_runs_the_exported_tiny_encoder(exported_classifier, classify_splits, tmp_path):
    """On the real export artifact (int8 BERT with token_type_ids) and no generate stats."""
    the_spec = spec(intents=[{"name": "billing", "description": "b"},
                             {"name": "password_reset", "description": "p"}],
                    refusals=[], escalation={"target_accuracy": 0.9})
    (tmp_path / "generate").mkdir()
    inputs = {"export": exported_classifier, "curate": classify_splits,
              "generate": tmp_path / "generate"}
    summary = evaluate.run(stage_context("evaluate", tmp_path / "evaluate", inputs, the_spec))
    assert 0.0 <= summary["escalation_rate"] <= 1.0 and summary["agreement"] is not None
    metrics = json.loads((tmp_path / "evaluate" / "metrics.json").read_text())
    assert metrics["n"] == {"val": 24, "test": 24}
    assert metrics["cascade"]["test"]["cost"]["teacher_cost_known"] is False
    # The real graph outputs the pooled embedding, so the default detector is fitted on it.
    ood = metrics["out_of_scope"]
    assert ood["detector"] == "mahalanobis" and ood["policy_bytes"] > 0
    assert set(ood["candidates"]) == {"mahalanobis", "knn", "energy", "max_prob"}


# Training rows of the embedding bag model: two per intent, at vote 6 and 3 on its own axis.
TRAIN = [("charged", "billing"), ("charged twice", "billing"), ("password", "password_reset"),
         ("my password", "password_reset"), ("crash", "technical_bug"), ("the crash", "technical_bug"),
         ("contract", "legal_advice"), ("help contract", "legal_advice")]
OFF_TOPIC = "write me a Python function that sorts a list"


def test_evaluate_ships_a_detector_that_answers_off_topic_messages_out_of_scope(upstream, tmp_path):
    bag_classifier(upstream["export"], embedding=True)
    write_jsonl(upstream["curate"] / "train.jsonl", records([(m, t, None, "log") for m, t in TRAIN]))
    write_jsonl(upstream["curate"] / "test.jsonl",
                records(TEST + [(OFF_TOPIC, "out_of_scope", None, "out_of_scope")]))
    the_spec = spec(escalation={"always": ["technical_bug"], "target_accuracy": 0.95,
                                "expected_out_of_scope": 0.2})
    run_bundle(upstream, tmp_path, the_spec)
    policy = json.loads((tmp_path / "bundle" / "policy.json").read_text())
    assert policy["format"] == 2 and policy["out_of_scope"]["kind"] == "mahalanobis"
    validation = policy["out_of_scope"]["validation"]
    assert validation["false_rate"] <= 0.02 and validation["recall"] is not None  # 1 OOS val row

    report = json.loads((tmp_path / "evaluate" / "metrics.json").read_text())["out_of_scope"]
    assert report["why"].startswith("the default: 1 out-of-scope validation queries")
    assert [p["share"] for p in report["curve"]][:3] == [0.0, 0.05, 0.1]
    assert report["expected"]["share"] == 0.2 and report["projection_basis"] == "measured"
    assert report["score_ms_per_request"] > 0

    answer = load_bundle(tmp_path / "bundle").predict({"message": OFF_TOPIC})
    assert answer["route"] == "out_of_scope" and answer["output"] == {"intent": "out_of_scope"}
    assert answer["out_of_scope_score"] > policy["out_of_scope"]["threshold"]
    assert answer["reason"].startswith("out of scope: mahalanobis score ")
    assert report["test"]["recall_by_cohort"] == {"out_of_scope": 1.0}  # the one test row
    html = (tmp_path / "bundle" / "report.html").read_text()
    assert "Out of scope" in html
