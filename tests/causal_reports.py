"""report.json and policy.json of extract and agent bundles, built by the code evaluate and bundle
run, over hand-made student answers instead of decoded ones: points from causal_data, scores from
evaluate_causal.quality (structured_metrics), the cascade from cascade.fit_threshold and
coverage_curve, routes from structured_runtime's policy.

The student is right on most points and wrong in a few known ways, listed per task below, so
tests can check figures worked out by hand."""

from __future__ import annotations

import copy
import json

from tiny_causal import EXTRACT_SCHEMA, TOOLS, agent_record, extract_record

from distill_compiler.metrics import cascade
from distill_compiler.runtime.causal import CausalPolicy
from distill_compiler.runtime.chat_format import ChatFormat, dumps
from distill_compiler.spec.models import Spec
from distill_compiler.students.causal import evaluate as evaluate_causal
from distill_compiler.students.causal.data import points

CHAT = ChatFormat()
TEACHER = "openai/gpt-4o-mini"
TARGET_ACCURACY = 0.9


def spec(task: str, description: str = "Answers order questions.") -> Spec:
    data = {"name": f"orders-{task}", "task": task, "description": description,
            "escalation": {"target_accuracy": TARGET_ACCURACY,
                           "triggers": [{"pattern": "lawyer", "reason": "legal"}]},
            "teacher": {"model": TEACHER},
            "export": {"quantize": "int8", "max_new_tokens": 64}}
    if task == "extract":
        schema = copy.deepcopy(EXTRACT_SCHEMA)
        schema["properties"]["issue"]["description"] = "What went wrong | in a word."
        data["output"] = {"schema": schema}
    else:
        data["tools"] = [dict(t) for t in TOOLS]
        data["refusals"] = [{"name": "legal_advice", "description": "Legal questions.",
                             "response": "I can't help with legal questions."}]
    return Spec.model_validate(data)


# Agent: conversations 0-5, each a call (depth 0) then a text reply (depth 1). Point 2 (the
# cancellation of conversation 1) gives the wrong reason; point 4 (conversation 2's lookup)
# replies in text instead of calling; point 7 (conversation 3's reply) calls again. The rest
# equal the teacher: agreement 9/12, tool-name accuracy 5/6, call exact match 4/6.
AGENT_CONVERSATIONS = range(6)


def agent_answers(task_spec: Spec) -> tuple[list, list[dict], list[dict]]:
    """Points, the constrained answers, and the unconstrained ones (two calls' arguments no
    longer validate: one malformed, one outside the enum)."""
    pts = [p for i in AGENT_CONVERSATIONS for p in points(agent_record(i), task_spec, CHAT)]
    answers = [copy.deepcopy(p.target) for p in pts]
    answers[2]["tool_calls"][0]["function"]["arguments"] = dumps(
        {"order_id": "A11", "reason": "other"})
    answers[4] = {"role": "assistant", "content": "Let me look that up."}
    answers[7] = copy.deepcopy(pts[6].target)
    free = copy.deepcopy(answers)
    free[0]["tool_calls"][0]["function"]["arguments"] = '{"order_id": "A10"'
    free[6]["tool_calls"][0]["function"]["arguments"] = dumps(
        {"order_id": "A13", "reason": "whatever"})
    return pts, answers, free


# Extract: extractions 0-9. Answer 3 gets `refund` wrong, answer 7 `issue`; the rest are right:
# agreement 8/10. Unconstrained, answer 5 is cut off mid-object (not JSON).
EXTRACTIONS = range(10)


def extract_answers(task_spec: Spec) -> tuple[list, list[dict], list[dict]]:
    pts = [p for i in EXTRACTIONS for p in points(extract_record(i), task_spec, CHAT)]
    objects = [json.loads(p.target["content"]) for p in pts]
    objects[3]["refund"] = not objects[3]["refund"]
    objects[7]["issue"] = "late" if objects[7]["issue"] != "late" else "other"
    answers = [{"role": "assistant", "content": dumps(o)} for o in objects]
    free = copy.deepcopy(answers)
    free[5]["content"] = free[5]["content"][:12]
    return pts, answers, free


def answered(policy: CausalPolicy, pts, messages, confidence, tokens: int = 12,
             seconds: float = 0.06) -> list:
    """Answers routed by the runtime's policy; `tokens` and `seconds` are each answer's."""
    out = []
    for point, message, conf in zip(pts, messages, confidence):
        routed = policy.decide(policy.trigger_text(point.input), message, conf, False)
        out.append(evaluate_causal.Answer(point, message, conf, False, routed.route,
                                          routed.reason, routed.rule, tokens, seconds))
    return out


def build(task: str, description: str = "Answers order questions.") -> tuple[Spec, dict, dict]:
    """(spec, policy.json, report.json) as the bundle stage writes them."""
    task_spec = spec(task, description)
    pts, answers, free = (agent_answers if task == "agent" else extract_answers)(task_spec)
    # Wrong answers get low confidence, so the fitted threshold keeps the right ones.
    right = evaluate_causal.agreements(task_spec, [
        evaluate_causal.Answer(p, m, 1.0, False, "student", "", "confident", 0, 0.0)
        for p, m in zip(pts, answers)])
    confidence = [0.95 - 0.01 * i if ok else 0.2 + 0.01 * i for i, ok in enumerate(right)]

    unthresholded = CausalPolicy(
        evaluate_causal.policy_dict(task_spec, CHAT, 0.0))
    val = answered(unthresholded, pts, answers, confidence)
    fit = cascade.fit_threshold(confidence, right, [a.rule for a in val], TARGET_ACCURACY)
    policy_data = evaluate_causal.policy_dict(task_spec, CHAT, fit.threshold)
    policy = CausalPolicy(policy_data)
    test = answered(policy, pts, answers, confidence)
    # Unconstrained decoding skips the schema mask (faster) and rambles on (more tokens).
    unconstrained = answered(policy, pts, free, confidence, tokens=15, seconds=0.05)
    metrics = {
        "n": {"val": len(val), "test": len(test)},
        "test": evaluate_causal.quality(task_spec, test),
        "unconstrained": {"schema_validity":
                          evaluate_causal.quality(task_spec, unconstrained)["schema_validity"]},
        "cascade": evaluate_causal.cascade_figures(task_spec, fit, val, test, TARGET_ACCURACY,
                                                   teacher_cost=None),
        "speed": evaluate_causal.speed(test, unconstrained),
    }
    policy_data["teacher"] = {"model": TEACHER, "api_base": None, "api_key_env": None}
    report = {
        "metrics": metrics,
        "gates": [{"gate": "min_schema_validity", "metric": "schema_validity",
                   "value": metrics["test"]["schema_validity"], "limit": 1.0,
                   "higher_is_better": True, "passed": True}],
        "curate": {"generated": 30, "kept": 28,
                   "dropped": {"duplicate": {"count": 2, "examples": []}},
                   "splits": {"train": 16, "val": 6, "test": 6}},
        "generate": {"requests": 30, "cached": 4, "cost_usd": 0.12, "prompt_tokens": 9000,
                     "completion_tokens": 1500, "by_source": {"teacher": 30},
                     "by_cohort": {"scenario": 30}, "rejected": {}},
        "train": {"method": "sft", "base": "scratch:2x64", "params": 140_352, "steps": 120,
                  "seconds": 41.5, "device": "cpu", "val_loss": 0.412, "lora": None,
                  "train_conversations": 16,
                  "sft": {"steps": 120, "seconds": 40.1, "epochs": [],
                          "train_loss": [{"step": 10, "loss": 3.9}, {"step": 120, "loss": 0.35}]}},
        "parity": {"quantize": "int8", "n": 6, "fp32_exact": 1.0, "shipped_agreement": 5 / 6,
                   "max_new_tokens": 64,
                   "sizes": {"model.onnx": 412_000, "model.fp32.onnx": 1_480_000}},
    }
    return task_spec, policy_data, report
