"""MODEL_CARD.md for a bundle: what the student is for, what it was trained on, how it measured.

Every figure comes from the bundle's report.json, so the card never disagrees with it.
"""

from __future__ import annotations

import json

from ..spec.models import OUT_OF_SCOPE
from .figures import (
    failure_rounds,
    int8_variant,
    megabytes,
    num,
    pct,
    pool_selection,
    recall_by_cohort,
)


def table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    lines += ["| " + " | ".join(cell(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def cell(value) -> str:
    """A table cell: one line, with pipes that cannot end the cell."""
    return " ".join(str(value).split("\n")).replace("|", "\\|")


def render(spec, policy: dict, report: dict) -> str:
    """The card as Markdown; `spec` is the bundle stage's view of the spec."""
    title = f"# {spec.name}\n\n{spec.description or 'A distilled ' + spec.task + ' student.'}"
    metrics = report["metrics"]
    if spec.task == "classify":
        sections = [
            intended_use(spec, policy),
            labels_section(spec, policy, metrics),
            data_section(report),
            training_section(spec, report),
            metrics_section(metrics),
            cascade_section(metrics, policy),
            limitations(spec, policy, metrics),
        ]
    else:
        sections = [
            structured_use(spec.task, policy),
            (fields_section(policy, metrics["test"]) if spec.task == "extract"
             else tools_section(policy, metrics["test"])),
            data_section(report),
            decoder_training_section(spec, report),
            structured_metrics_section(spec.task, metrics),
            structured_cascade_section(metrics, policy),
            speed_section(metrics.get("speed", {})),
            structured_limitations(spec, policy, metrics),
        ]
    return "\n\n".join([title, *sections]) + "\n"


def intended_use(spec, policy: dict) -> str:
    field = policy.get("text_field")
    reads = f"the `{field}` field of each request" if field else "each request as canonical JSON"
    teacher = policy.get("teacher", {}).get("model") or "the teacher (not configured)"
    return (
        "## Intended use\n\n"
        f"Routes requests to one of {len(policy['labels'])} labels, reading {reads} "
        f"(truncated to {policy['max_length']} tokens). It answers the traffic it is confident "
        f"about and hands the rest to {teacher}: load it with `distill_compiler.runtime."
        "load_bundle` and forward every answer whose route is `teacher`. It is not meant for "
        "requests outside the labels below; those should come out as "
        f"`{OUT_OF_SCOPE}` or escalate.")


def labels_section(spec, policy: dict, metrics: dict) -> str:
    descriptions = {i.name: i.description for i in spec.intents}
    descriptions.update({r.name: r.description for r in spec.refusals})
    descriptions.setdefault(OUT_OF_SCOPE, "Requests outside every intent.")
    per_label = metrics["test"]["per_label"]
    rows = []
    for label in policy["labels"]:
        kind = ("refusal" if label in policy["refusals"] else
                "always escalates" if label in policy["always_escalate"] else "answered")
        row = per_label.get(label, {})
        rows.append([f"`{label}`", descriptions.get(label, ""), kind, row.get("support", 0),
                     num(row.get("f1"))])
    return "## Labels\n\n" + table(["label", "description", "handling", "test support", "test F1"], rows)


def data_section(report: dict) -> str:
    generate, curate = report["generate"], report["curate"]
    splits = curate.get("splits", {})
    sources = ", ".join(f"{k}: {v}" for k, v in sorted(generate.get("by_source", {}).items()))
    cohorts = ", ".join(f"{k}: {v}" for k, v in sorted(generate.get("by_cohort", {}).items()))
    dropped = ", ".join(f"{rule}: {d['count']}" for rule, d in sorted(curate.get("dropped", {}).items()))
    return (
        "## Data\n\n"
        f"- Examples produced: {curate.get('generated', 'n/a')} ({sources or 'no breakdown'}); "
        f"kept after curation: {curate.get('kept', 'n/a')}.\n"
        f"- By cohort: {cohorts or 'n/a'}.\n"
        f"{confusable_line(generate.get('confusable_pairs'))}"
        f"- Dropped by rule: {dropped or 'none'}.\n"
        f"- Splits: train {splits.get('train', 'n/a')}, validation {splits.get('val', 'n/a')}, "
        f"test {splits.get('test', 'n/a')}.\n"
        f"- Teacher requests paid: {generate.get('requests', 'n/a')} "
        f"(cost ${generate.get('cost_usd', 0):.2f}), reused from cache: {generate.get('cached', 'n/a')}."
        + (f"\n- Unlabeled pool: {pool_selection(generate)}." if generate.get("pool") else "")
        + (f"\n- Rounds on failures: {failure_rounds(generate)}." if failure_rounds(generate) else ""))


def confusable_line(pairs: list[dict] | None) -> str:
    """The intent pairs that got hard negatives, named or found, as one bullet (or none)."""
    if not pairs:
        return ""
    items = []
    for p in pairs:
        how = "named" if p["source"] == "named" else f"found, cosine {p['cosine']:.3f}"
        items.append(f"`{p['pair'][0]}` ~ `{p['pair'][1]}` ({how}): {p['examples']}")
    return f"- Hard negatives per confusable pair: {'; '.join(items)}.\n"


def training_section(spec, report: dict) -> str:
    train, parity = report["train"], report["parity"]
    sizes = parity.get("sizes", {})
    shipped = sizes.get("model.onnx")
    return (
        "## Model\n\n"
        f"- Student: `{spec.student.base}`, method `{spec.student.method}`, "
        f"{train.get('params', 'n/a')} parameters; epochs run {train.get('epochs_run', 'n/a')} "
        f"(best {train.get('best_epoch', 'n/a')}), validation agreement "
        f"{pct(train.get('val_agreement'))}.\n"
        + layers_line(train)
        + f"- Export: ONNX, quantization `{parity.get('quantize', spec.export.quantize)}`"
        + int8_variant(parity) + (f", {megabytes(shipped)}" if shipped else "")
        + f"; argmax agreement with the trained model {pct(parity.get('agreement_shipped'))}.")


def layers_line(train: dict) -> str:
    """With student.layers: how deep the shipped encoder is against the model it was cut from."""
    if not train.get("layers"):
        return ""
    return (f"- Layers: {train['layers']}, cut from the fine-tuned full-depth model and "
            f"distilled from its soft labels; the full-depth model's validation agreement was "
            f"{pct(train.get('full_depth_val_agreement'))}.\n")


def metrics_section(metrics: dict) -> str:
    test, cal = metrics["test"], metrics["calibration"]
    pairs = ", ".join(f"{p['target']} → {p['predicted']} ({p['count']})"
                      for p in test["confused_pairs"][:5]) or "none"
    cohort_rows = [[f"`{c}`", v["n"], pct(v["agreement"]), pct(v["accuracy"])]
                   for c, v in test["per_cohort"].items()]
    return (
        f"## Metrics (test, {test['n']} examples)\n\n"
        f"- Agreement with the teacher: {pct(test['agreement'])}; macro F1 {num(test['macro_f1'])}.\n"
        f"- Accuracy against gold labels: {pct(test['accuracy'])} "
        f"({test['gold_n']} examples with gold).\n"
        f"- Calibration: temperature {cal['temperature']:.3f}, ECE {num(cal['ece_before'])} "
        f"before and {num(cal['ece_after'])} after.\n"
        f"- Most confused (teacher → student): {pairs}.\n\n"
        + table(["cohort", "n", "agreement", "gold accuracy"], cohort_rows))


def cascade_section(metrics: dict, policy: dict) -> str:
    cas, latency = metrics["cascade"], metrics["latency"]
    test, cost = cas["test"], cas["test"]["cost"]
    cost_line = (f"${cost['cascade_usd_per_1k']:.3f} per 1,000 requests against "
                 f"${cost['all_teacher_usd_per_1k']:.3f} for the teacher alone"
                 if cost["teacher_cost_known"] else
                 "teacher cost unknown (its traffic was replayed from logs)")
    return (
        "## Cascade\n\n"
        f"- {cas['explanation']}.\n"
        f"- On test: {pct(test['escalation_rate'])} escalated "
        f"({', '.join(f'{k}: {v}' for k, v in test['escalations_by_rule'].items()) or 'none'}); "
        f"the student's own answers agree with the teacher {pct(test['accepted_accuracy'])} of "
        f"the time; with the teacher answering escalations, {pct(test['end_to_end_accuracy'])} "
        f"end to end.\n"
        f"- Teacher calls: {num(cost['teacher_calls_per_1k'], 0)} per 1,000 requests; {cost_line}.\n"
        f"- Latency at batch 1 (tokenizer + model, CPU): p50 {num(latency['p50_ms'], 2)} ms, "
        f"p99 {num(latency['p99_ms'], 2)} ms.\n"
        f"- Triggers: {', '.join('`' + t['pattern'] + '`' for t in policy['triggers']) or 'none'}; "
        f"always escalated: {', '.join(policy['always_escalate']) or 'none'}."
        + out_of_scope_lines(metrics.get("out_of_scope")))


def out_of_scope_lines(ood: dict | None) -> str:
    """The detector, and what the cascade does at the out-of-scope share the spec expects."""
    if not ood or not ood.get("detector"):
        return ""
    test = ood["test"]
    lines = (f"\n- Out of scope: the {ood['detector']} detector ({ood['why']}) answers "
             f"`{OUT_OF_SCOPE}` above score {num(ood['threshold'], 4)}; on test it flags "
             f"{pct(test['false_rate'])} of in-scope queries"
             + (f" and {pct(test['recall'])} of out-of-scope ones{recall_by_cohort(test)}"
                if test["recall"] is not None
                else "") + ".")
    expected = ood.get("expected")
    if expected:
        basis = ("measured" if ood["projection_basis"] == "measured" else
                 "worst case, as the logs held no out-of-scope queries")
        lines += (f"\n- At {pct(expected['share'])} out-of-scope traffic ({basis}): accepted "
                  f"accuracy {pct(expected['accepted_accuracy'])}, escalation "
                  f"{pct(expected['escalation_rate'])}.")
    return lines


def limitations(spec, policy: dict, metrics: dict) -> str:
    test = metrics["test"]
    weakest = sorted(((v["agreement"], c) for c, v in test["per_cohort"].items()
                      if v["agreement"] is not None))[:2]
    items = [
        "It learned from the teacher's labels, so it inherits the teacher's mistakes; agreement "
        "measures fidelity to the teacher, not correctness"
        + ("." if test["gold_n"] else ", and no gold labels were available to measure that."),
        f"Text beyond {policy['max_length']} tokens is cut off before the model sees it.",
        "Confidence is calibrated on the validation split; traffic that drifts from it "
        "(new products, new phrasing) makes the threshold less reliable: re-run evaluate on "
        "fresh logs.",
    ]
    items.append(languages(spec))
    if weakest:
        items.append("Weakest cohorts on test: "
                     + ", ".join(f"`{c}` ({pct(a)})" for a, c in weakest) + ".")
    return "## Limitations\n\n" + "\n".join(f"- {item}" for item in items)


def languages(spec) -> str:
    if spec.data.languages != ("en",) or "multilingual" in spec.data.registers:
        return f"Languages covered: {', '.join(spec.data.languages)}."
    return "Trained on English only."


# --- extract and agent ------------------------------------------------------------------------

def structured_use(task: str, policy: dict) -> str:
    teacher = policy.get("teacher", {}).get("model") or "the teacher (not configured)"
    if task == "extract":
        schema = policy.get("output_schema") or {}
        field = policy.get("text_field")
        reads = (f"the `{field}` field of each request" if field
                 else "each request as canonical JSON")
        fields = ", ".join(f"`{k}`" for k in schema.get("properties", {})) or "its schema's fields"
        what = (f"Extracts one JSON object ({fields}) from {reads}. Decoding is constrained to the "
                "output schema, so every answer parses and validates against it; the constraint "
                "fixes the shape of an answer, not its values.")
        refusals = ""
    else:
        names = ", ".join(f"`{t['name']}`" for t in policy.get("tools", ())) or "none"
        what = ("Takes a chat (`{\"messages\": [...]}` in OpenAI format, optionally "
                "`\"tools\": [names]` to offer only some tools) and writes the next assistant "
                f"turn: a text reply or calls to its tools ({names}). Each call is decoded under the "
                "called tool's argument schema, so its arguments always validate. The "
                "tool-calling loop belongs to the host: it runs each call, appends the assistant "
                "message and one `tool` message per result, and asks again; the student never "
                "runs a tool itself.")
        names = ", ".join(f"`{name}`" for name in policy.get("refusals", {}))
        refusals = (f" A reply equal to a refusal's fixed response ({names}) comes back with "
                    "route `refusal`." if names else "")
    return (
        f"## Intended use\n\n{what}\n\n"
        "Load it with `distill_compiler.runtime.load_bundle`. Answers are greedy, at most "
        f"{policy.get('max_new_tokens', 'n/a')} new tokens. It answers what it is confident about "
        f"and hands the rest to {teacher}: a request goes to route `teacher` (forward it) when a "
        "trigger matches it, when its answer is cut short at that limit, or when the answer's "
        "confidence (the probability of its least certain decoding choice) is under "
        f"{num(policy.get('threshold'))}.{refusals}")


def fields_section(policy: dict, test: dict) -> str:
    """Every leaf field evaluate scored, and schema fields test never exercised."""
    schema = policy.get("output_schema") or {}
    per_field = (test.get("fields") or {}).get("per_field", {})
    required = set(schema.get("required", ()))
    unseen = [name for name in schema.get("properties", {})
              if not any(within(path, name) for path in per_field)]
    rows = []
    for path in [*per_field, *unseen]:
        node, v = schema_at(schema, path), per_field.get(path, {})
        rows.append([f"`{path}`", type_text(node), "yes" if path in required else "",
                     node.get("description", ""), v.get("support", 0), num(v.get("precision")),
                     num(v.get("recall")), num(v.get("f1"))])
    return ("## Output fields\n\n"
            + table(["field", "type", "required", "description", "test support", "precision",
                     "recall", "F1"], rows)
            + "\n\nScores are per leaf value against the teacher's object: `a.b` is a nested "
              "field, `a[]` an array element taken whole; support counts the teacher's values.")


def within(path: str, field: str) -> bool:
    """Whether a leaf path lies in the top-level field `field`."""
    return path == field or path.startswith((field + ".", field + "[]"))


def schema_at(schema: dict, path: str) -> dict:
    """The subschema a leaf path (`a.b`, `a[]`) points at; {} where the schema does not say."""
    node = schema
    for part in path.split("."):
        node = (node.get("properties") or {}).get(part.removesuffix("[]"), {})
        if part.endswith("[]"):
            node = node.get("items") or {}
    return node


def type_text(node: dict) -> str:
    if "enum" in node:
        return "one of " + ", ".join(json.dumps(v, ensure_ascii=False) for v in node["enum"])
    if "const" in node:
        return "= " + json.dumps(node["const"], ensure_ascii=False)
    kind = node.get("type")
    if kind == "array":
        return "array of " + type_text(node.get("items") or {})
    if isinstance(kind, list):
        return " or ".join(kind)
    return kind or "any"


def tools_section(policy: dict, test: dict) -> str:
    per_tool = test.get("per_tool", {})
    rows = []
    for tool in policy.get("tools", ()):
        v = per_tool.get(tool["name"], {})
        rows.append([f"`{tool['name']}`", tool.get("description", ""),
                     argument_list(tool.get("parameters") or {}), v.get("call_turns", 0),
                     pct(v.get("tool_name_accuracy")), pct(v.get("call_exact_match")),
                     num((v.get("arguments") or {}).get("f1"))])
    return ("## Tools\n\n"
            + table(["tool", "description", "arguments", "test calls", "tool-name accuracy",
                     "call exact match", "argument F1"], rows)
            + "\n\nTest calls: test turns where the teacher called the tool. Exact match: the "
              "student made the same calls with canonically equal arguments.")


def argument_list(parameters: dict) -> str:
    required = set(parameters.get("required", ()))
    names = [f"`{name}`" + ("" if name in required else " (optional)")
             for name in parameters.get("properties", {})]
    return ", ".join(names) or "none"


def decoder_training_section(spec, report: dict) -> str:
    train, parity = report["train"], report["parity"]
    lora = train.get("lora")
    adapted = (f"LoRA r={lora.get('r')}, alpha {lora.get('alpha')} on "
               f"{', '.join(lora.get('target_modules', ()))}, merged before export"
               if lora else "all weights trained")
    losses = [p["loss"] for p in (train.get("sft") or {}).get("train_loss", ())]
    loss = f", training loss {losses[0]:.3f} → {losses[-1]:.3f}" if losses else ""
    shipped = parity.get("sizes", {}).get("model.onnx")
    return (
        "## Model\n\n"
        f"- Student: `{train.get('base', spec.student.base)}`, method "
        f"`{train.get('method', spec.student.method)}`, {count(train.get('params'))} parameters; "
        f"{adapted}.\n"
        f"- Training: {count(train.get('steps'))} steps in {num(train.get('seconds'), 0)} s on "
        f"{train.get('device', 'n/a')}{loss}; final validation loss {num(train.get('val_loss'))}; "
        f"{count(train.get('train_conversations'))} training conversations.\n"
        f"- Export: ONNX decoder with KV cache, quantization "
        f"`{parity.get('quantize', spec.export.quantize)}`"
        + (f", {megabytes(shipped)}" if shipped else "")
        + f"; greedy outputs of the shipped model equal the trained model's on "
          f"{pct(parity.get('shipped_agreement'))} of {parity.get('n', 'n/a')} validation prompts "
          f"(fp32 graph: {pct(parity.get('fp32_exact'))}).")


def count(value) -> str:
    return f"{value:,}" if isinstance(value, int) else "n/a"


def structured_metrics_section(task: str, metrics: dict) -> str:
    test = metrics["test"]
    free = metrics.get("unconstrained", {}).get("schema_validity")
    if task == "extract":
        fields = test.get("fields") or {}
        lines = [
            f"Agreement with the teacher: {pct(test['agreement'])} (the whole object equals the "
            "teacher's, strings compared case- and space-insensitively).",
            f"Schema validity: {pct(test['schema_validity'])} constrained, {pct(free)} with plain "
            f"greedy decoding of the same model; parsed as JSON: {pct(test.get('parsed'))}.",
            f"Fields (micro over leaf values): precision {num(fields.get('precision'))}, recall "
            f"{num(fields.get('recall'))}, F1 {num(fields.get('f1'))}.",
            (f"Accuracy against gold: {pct(test.get('accuracy'))} ({test['gold_n']} examples "
             "with gold)." if test.get("gold_n") else "No gold objects: accuracy against gold "
                                                      "was not measured."),
        ]
        return (f"## Metrics (test, {test['n']} answers)\n\n"
                + "\n".join(f"- {line}" for line in lines))
    arguments = test.get("arguments") or {}
    lines = [
        f"Agreement with the teacher: {pct(test['agreement'])} (the same tool calls, or a text "
        "reply where the teacher replied in text).",
        f"Schema validity of the student's {test.get('student_calls', 0)} tool calls: "
        f"{pct(test['schema_validity'])} constrained, {pct(free)} with plain greedy decoding.",
        f"Call decision (a tool call exactly when the teacher made one): "
        f"{pct(test.get('call_decision_accuracy'))}; missed calls {test.get('missed_calls', 0)}, "
        f"spurious calls {test.get('spurious_calls', 0)}.",
        f"On the {test.get('call_turns', 0)} turns where the teacher called a tool: tool-name "
        f"accuracy {pct(test.get('tool_name_accuracy'))}, call exact match "
        f"{pct(test.get('call_exact_match'))}.",
        f"Arguments ((tool, argument, value) triples): precision "
        f"{num(arguments.get('precision'))}, recall {num(arguments.get('recall'))}, F1 "
        f"{num(arguments.get('f1'))}.",
        f"Text replies ({test.get('text_turns', 0)}): token F1 {num(test.get('text_token_f1'))}.",
    ]
    depth_rows = [[d, v["n"], pct(v["agreement"]), pct(v.get("call_exact_match")),
                   num((v.get("arguments") or {}).get("f1")), num(v.get("text_token_f1"))]
                  for d, v in test.get("per_depth", {}).items()]
    return (f"## Metrics (test, {test['n']} assistant turns)\n\n"
            + "\n".join(f"- {line}" for line in lines)
            + "\n\nPer depth (assistant turns earlier in the conversation):\n\n"
            + table(["depth", "turns", "agreement", "call exact match", "argument F1",
                     "text token F1"], depth_rows))


def structured_cascade_section(metrics: dict, policy: dict) -> str:
    cas = metrics["cascade"]
    test = cas["test"]
    rate = test.get("escalation_rate")
    rules = ", ".join(f"{k}: {v}" for k, v in test.get("escalations_by_rule", {}).items())
    triggers = ", ".join("`" + t["pattern"] + "`" for t in policy.get("triggers", ())) or "none"
    return (
        "## Cascade\n\n"
        f"- {cas['explanation']}.\n"
        f"- On test: {pct(rate)} escalated ({rules or 'none'}); the student's own answers agree with the teacher {pct(test.get('accepted_accuracy'))} "
        f"of the time; with the teacher answering escalations, "
        f"{pct(test.get('end_to_end_accuracy'))} end to end.\n"
        f"- Teacher calls: {num(None if rate is None else 1000 * rate, 0)} per 1,000 requests.\n"
        f"- Triggers: {triggers}.")


def speed_section(speed: dict) -> str:
    rows = [[label, num(v.get("tokens_per_second"), 0), num(v.get("answer_p50_ms"), 1),
             num(v.get("answer_p99_ms"), 1), num(v.get("mean_tokens"), 1)]
            for label, v in (("constrained (ships)", speed.get("constrained") or {}),
                             ("unconstrained", speed.get("unconstrained") or {}))]
    return ("## Speed\n\nGreedy decoding with the KV cache at batch 1, on the build machine's "
            "CPU with onnxruntime, over the test answers.\n\n"
            + table(["decoding", "tokens/s", "answer p50 (ms)", "answer p99 (ms)",
                     "mean tokens per answer"], rows))


def structured_limitations(spec, policy: dict, metrics: dict) -> str:
    test = metrics["test"]
    items = [
        "It learned from the teacher's answers, so it inherits the teacher's mistakes; agreement "
        "measures fidelity to the teacher, not correctness.",
        "Constrained decoding guarantees valid JSON for the schema, not right values: a valid "
        "answer can still hold a wrong value.",
        f"Answers longer than {policy.get('max_new_tokens', 'n/a')} tokens are cut off and "
        "escalate.",
        "The threshold is fitted on the validation split; traffic that drifts from it makes it "
        "less reliable: re-run evaluate on fresh logs.",
    ]
    if spec.task == "agent":
        depths = [int(d) for d in test.get("per_depth", {})]
        items += [
            "Text replies have no exact target: the cascade accepts any text reply where the "
            "teacher replied in text, and their quality is measured only by token F1.",
            "Tool results reach the student as the host passes them; it was trained on the "
            "results in its data (logged, spec examples or teacher-simulated).",
        ]
        if depths:
            items.append(f"Measured up to depth {max(depths)}; longer conversations are untested "
                         "and grow the prompt.")
        weakest = sorted((v["call_exact_match"], name)
                         for name, v in test.get("per_tool", {}).items()
                         if v.get("call_exact_match") is not None)[:2]
        what, shown = "tools on test (call exact match)", pct
    else:
        weakest = sorted((v["f1"], path) for path, v in
                         (test.get("fields") or {}).get("per_field", {}).items()
                         if v.get("f1") is not None)[:2]
        what, shown = "fields on test (F1)", num
    items.append(languages(spec))
    if weakest:
        items.append(f"Weakest {what}: "
                     + ", ".join(f"`{name}` ({shown(value)})" for value, name in weakest) + ".")
    return "## Limitations\n\n" + "\n".join(f"- {item}" for item in items)
