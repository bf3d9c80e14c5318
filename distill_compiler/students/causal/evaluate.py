"""Evaluate an extract or agent student and fit its cascade, on what ships.

Every answer is produced by runtime.causal's policy and runtime.decoder over export's
model.onnx: the prompt the runtime builds, constrained decoding, the confidence it computes.
The threshold is fitted on validation points (the lowest confidence whose accepted answers reach
escalation.target_accuracy agreement with the teacher), then every figure is measured on test.

Agreement, for the cascade: an extraction agrees when it equals the teacher's object after
normalisation; an agent turn agrees when its tool calls equal the teacher's, or, where the
teacher answered in text, when the student answered in text too (text has no exact target).
Schema validity is measured twice, with and without constrained decoding, so the report shows
what the constraint buys; constrained validity must be 100 %.
"""

from __future__ import annotations

import json
import statistics
from dataclasses import dataclass

import numpy as np

from ...data.records import read_jsonl
from ...metrics import cascade
from ...metrics import structured as structured_metrics
from ...runtime.chat_format import ChatFormat
from ...runtime.format import (
    CHAT_FILE,
    POLICY_FILE,
    POLICY_FORMAT,
    routing_fields,
    text_field_of,
    write_policy,
)
from . import data as causal_data


@dataclass(frozen=True)
class Answer:
    point: causal_data.Point
    message: dict
    confidence: float
    truncated: bool
    route: str
    reason: str
    rule: str
    tokens: int
    seconds: float


def evaluate(ctx) -> dict:
    from ...runtime.causal import CausalPolicy  # onnxruntime loads only here
    from ...runtime.decoder import Decoder

    spec = ctx.spec
    export, curate = ctx.inputs["export"].path, ctx.inputs["curate"].path
    chat = ChatFormat.from_dict(json.loads((export / CHAT_FILE).read_text()))
    decoder = Decoder(export)
    val = split_points(curate / "val.jsonl", spec, chat)
    test = split_points(curate / "test.jsonl", spec, chat)
    ctx.log(f"evaluate: {len(val)} validation and {len(test)} test points")

    unthresholded = CausalPolicy(policy_dict(spec, chat, threshold=0.0))
    decoder.warm(unthresholded.shared_prefix())  # as the bundle does when it loads
    val_answers = answer_all(val, decoder, unthresholded, ctx, "validation")
    target = spec.escalation.target_accuracy
    fit = cascade.fit_threshold([a.confidence for a in val_answers], agreements(spec, val_answers),
                                [a.rule for a in val_answers], target)
    ctx.log(f"evaluate: {fit.explain(target)}")
    policy_data = policy_dict(spec, chat, fit.threshold)
    policy = CausalPolicy(policy_data)
    test_answers = answer_all(test, decoder, policy, ctx, "test")
    free = answer_all(test, decoder, policy, ctx, "test, unconstrained", constrain=False)

    report = {
        "n": {"val": len(val), "test": len(test)},
        "test": quality(spec, test_answers),
        "unconstrained": {"schema_validity": quality(spec, free)["schema_validity"]},
        "cascade": cascade_figures(spec, fit, val_answers, test_answers, target,
                                   cascade.teacher_cost_per_request(ctx.inputs["generate"].path / "stats.json")),
        "speed": speed(test_answers, free),
    }
    write_policy(ctx.out / POLICY_FILE, policy_data)
    (ctx.out / "metrics.json").write_text(json.dumps(report, indent=2, sort_keys=True))
    with open(ctx.out / "predictions.jsonl", "w", encoding="utf-8") as f:
        for a in test_answers:
            f.write(json.dumps(prediction(a), sort_keys=True, ensure_ascii=False) + "\n")
    return summarize(report)


def split_points(path, spec, chat: ChatFormat) -> list[causal_data.Point]:
    return [p for record in read_jsonl(path) for p in causal_data.points(record, spec, chat)]


def answer_all(points, decoder, policy, ctx, what: str, constrain: bool = True) -> list[Answer]:
    advance = ctx.reporter.progress(f"evaluate: {what}", len(points))
    out = []
    for point in points:
        out.append(answer(point, decoder, policy, constrain))
        advance(1)
    return out


def answer(point, decoder, policy, constrain: bool) -> Answer:
    completion = decoder.complete(policy.prompt(point.input), policy.mode(point.input),
                                  policy.max_new_tokens, constrain=constrain)
    routed = policy.decide(policy.trigger_text(point.input), completion.message,
                           completion.confidence, completion.truncated)
    return Answer(point, completion.message, completion.confidence, completion.truncated,
                  routed.route, routed.reason, routed.rule, completion.new_tokens,
                  completion.seconds)


def agrees(spec, a: Answer) -> bool:
    if spec.task == "extract":
        return structured_metrics.extraction_agrees(a.message.get("content"),
                                                    json.loads(a.point.target["content"]))
    return structured_metrics.turn_agrees(a.message, a.point.target)


def agreements(spec, answers: list[Answer]) -> list[bool]:
    return [agrees(spec, a) for a in answers]


def quality(spec, answers: list[Answer]) -> dict:
    """structured_metrics' report for the task, over every test point."""
    if spec.task == "extract":
        return structured_metrics.extract_report(
            [a.message.get("content") for a in answers],
            [json.loads(a.point.target["content"]) for a in answers],
            [None] * len(answers), spec.output.schema_)
    return structured_metrics.agent_report([a.message for a in answers],
                                           [a.point.target for a in answers],
                                           [a.point.tools for a in answers],
                                           [a.point.depth for a in answers])


def cascade_figures(spec, fit, val: list[Answer], test: list[Answer], target: float,
                    teacher_cost: float | None) -> dict:
    return {
        "target_accuracy": target, "threshold": fit.threshold, "reached": fit.reached,
        "explanation": fit.explain(target), "val_accepted_accuracy": fit.accuracy,
        "val_coverage": fit.coverage,
        "val_curve": cascade.coverage_curve([a.confidence for a in val], agreements(spec, val),
                                            [a.rule for a in val]),
        "test": cascade.cascade_report([a.route for a in test], [a.rule for a in test],
                                       agreements(spec, test), teacher_cost),
    }


def speed(constrained: list[Answer], free: list[Answer]) -> dict:
    """Decoding throughput and per-answer latency on test, constrained and not."""
    def figures(answers: list[Answer]) -> dict:
        tokens, seconds = sum(a.tokens for a in answers), sum(a.seconds for a in answers)
        ms = [1000 * a.seconds for a in answers]
        return {"tokens": tokens, "tokens_per_second": tokens / seconds if seconds else None,
                "answer_p50_ms": float(np.percentile(ms, 50)) if ms else None,
                "answer_p99_ms": float(np.percentile(ms, 99)) if ms else None,
                "mean_tokens": statistics.fmean(a.tokens for a in answers) if answers else None}
    return {"constrained": figures(constrained), "unconstrained": figures(free)}


def policy_dict(spec, chat: ChatFormat, threshold: float) -> dict:
    """policy.json: everything runtime.causal.CausalPolicy applies to a request."""
    data = {
        "format": POLICY_FORMAT,
        "task": spec.task,
        "chat": chat.to_dict(),
        "description": spec.description,
        "max_new_tokens": spec.export.max_new_tokens,
        "threshold": threshold,
        **routing_fields(spec.escalation, spec.refusals, spec.teacher),
    }
    if spec.task == "extract":
        data.update(output_schema=spec.output.schema_, input_schema=spec.input.schema_,
                    text_field=text_field_of(spec.input.schema_))
    else:
        data["tools"] = causal_data.spec_tools(spec)
    return data


def prediction(a: Answer) -> dict:
    return {"id": a.point.id, "depth": a.point.depth, "cohort": a.point.cohort,
            "target": a.point.target, "predicted": a.message, "confidence": round(a.confidence, 6),
            "route": a.route, "reason": a.reason, "tokens": a.tokens}


def summarize(report: dict) -> dict:
    test, cas = report["test"], report["cascade"]["test"]
    values = {"agreement": test["agreement"], "schema_validity": test["schema_validity"],
              "schema_validity_unconstrained": report["unconstrained"]["schema_validity"],
              "escalation_rate": cas["escalation_rate"],
              "accepted_accuracy": cas["accepted_accuracy"],
              "threshold": report["cascade"]["threshold"],
              "tokens_per_second": report["speed"]["constrained"]["tokens_per_second"]}
    return {k: None if v is None else round(v, 4) for k, v in values.items()}
