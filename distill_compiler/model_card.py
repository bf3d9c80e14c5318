"""MODEL_CARD.md for a bundle: what the student is for, what it was trained on, how it measured.

Every figure comes from the bundle's report.json, so the card never disagrees with it.
"""

from __future__ import annotations

from .spec import OUT_OF_SCOPE


def pct(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.1%}"


def num(value: float | None, digits: int = 3) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def megabytes(size: int) -> str:
    return f"{size / 1e6:.1f} MB" if size >= 1e5 else f"{size / 1e3:.1f} kB"


def table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    lines += ["| " + " | ".join(str(c).replace("|", "\\|") for c in row) + " |" for row in rows]
    return "\n".join(lines)


def render(spec, policy: dict, report: dict) -> str:
    """The card as Markdown; `spec` is the bundle stage's view of the spec."""
    sections = [
        f"# {spec.name}\n\n{spec.description or 'A distilled ' + spec.task + ' student.'}",
        intended_use(spec, policy),
        labels_section(spec, policy, report["metrics"]),
        data_section(report),
        training_section(spec, report),
        metrics_section(report["metrics"]),
        cascade_section(report["metrics"], policy),
        limitations(spec, policy, report["metrics"]),
    ]
    return "\n\n".join(sections) + "\n"


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
        f"- Dropped by rule: {dropped or 'none'}.\n"
        f"- Splits: train {splits.get('train', 'n/a')}, validation {splits.get('val', 'n/a')}, "
        f"test {splits.get('test', 'n/a')}.\n"
        f"- Teacher requests paid: {generate.get('requests', 'n/a')} "
        f"(cost ${generate.get('cost_usd', 0):.2f}), reused from cache: {generate.get('cached', 'n/a')}.")


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
        f"- Export: ONNX, quantization `{parity.get('quantize', spec.export.quantize)}`"
        + (f", {megabytes(shipped)}" if shipped else "")
        + f"; argmax agreement with the trained model {pct(parity.get('agreement_shipped'))}.")


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
        f"always escalated: {', '.join(policy['always_escalate']) or 'none'}.")


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
    if spec.data.languages != ("en",) or "multilingual" in spec.data.registers:
        items.append(f"Languages covered: {', '.join(spec.data.languages)}.")
    else:
        items.append("Trained on English only.")
    if weakest:
        items.append("Weakest cohorts on test: "
                     + ", ".join(f"`{c}` ({pct(a)})" for a, c in weakest) + ".")
    return "## Limitations\n\n" + "\n".join(f"- {item}" for item in items)
