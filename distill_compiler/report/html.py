"""report.html for a bundle: the figures of report.json as one static page with inline SVG charts.

The page loads nothing from anywhere (no scripts, fonts, stylesheets or images), so it opens
from a file:// URL on an offline machine and can be attached to a review as it is. Charts are
SVG drawn here from report.json, which keeps the page in step with the card and the JSON. Every
string that comes from data (labels, cohorts, rule names, the spec's description) passes
through esc(); numbers are formatted here.
"""

from __future__ import annotations

import html
import math
from dataclasses import dataclass

from .figures import (
    failure_rounds,
    int8_variant,
    megabytes,
    num,
    pct,
    pool_selection,
    recall_by_cohort,
)

LATENCY_BINS = 30
SPLIT_ORDER = {"train": 0, "val": 1, "test": 2}
# What reaches the teacher whatever the threshold, so the coverage curve leaves it out.
CLASSIFY_FORCED = "triggered and always-escalated requests"
STRUCTURED_FORCED = "triggered requests and answers cut short at max_new_tokens"
BLUE, RED, GREEN, GREY = (37, 99, 235), (220, 38, 38), (22, 163, 74), (148, 163, 184)


def render(report: dict, name: str, description: str = "") -> str:
    """The whole page; `report` is the bundle's report.json, for any task."""
    metrics = report["metrics"]
    task = task_of(metrics)
    sections = (classify_sections(report) if task == "classify"
                else structured_sections(report, task))
    return PAGE.format(title=esc(name), description=esc(description),
                       subtitle=esc(subtitle(task, metrics)), css=CSS, body="\n".join(sections))


def task_of(metrics: dict) -> str:
    """Which task evaluate measured, from the shape of its metrics.json: an agent report scores
    per tool, an extract report per field, a classifier per label."""
    test = metrics["test"]
    return "agent" if "per_tool" in test else "extract" if "fields" in test else "classify"


def subtitle(task: str, metrics: dict) -> str:
    if task == "classify":
        return (f"{len(metrics['labels'])} labels · {metrics['test']['n']} test and "
                f"{metrics['n']['val']} validation examples")
    unit = "answers" if task == "extract" else "assistant turns"
    return (f"{task} · {metrics['test']['n']} test and {metrics['n']['val']} validation {unit}")


def classify_sections(report: dict) -> list[str]:
    metrics = report["metrics"]
    test, cascade = metrics["test"], metrics["cascade"]
    return [
        section("metrics", "Headline metrics", metrics_table(report) + gates_list(report["gates"])),
        row(section("confusion", "Confusion on test (teacher × student)",
                    confusion_chart(test.get("confusion"))),
            section("labels", "Per label on test", label_table(test["per_label"]))),
        section("calibration", "Reliability before and after calibration",
                calibration_charts(metrics["calibration"])),
        row(section("cascade", "Coverage and accuracy on validation", coverage_chart(cascade)),
            section("latency", "Latency at batch 1", latency_chart(metrics["latency"]))),
        row(section("cohorts", "Agreement per cohort on test", cohort_chart(test["per_cohort"])),
            section("data", "Data funnel", funnel_chart(report["generate"], report["curate"])
                    + confusable_table(report["generate"].get("confusable_pairs")))),
        section("cost", "Teacher traffic and cost", cost_section(report["generate"],
                                                                 cascade["test"])),
        *([section("out-of-scope", "Out of scope: accepted accuracy against the out-of-scope share",
                   out_of_scope_section(metrics["out_of_scope"], cascade["target_accuracy"]))]
          if metrics.get("out_of_scope") else []),
    ]


def structured_sections(report: dict, task: str) -> list[str]:
    """Extract and agent: no labels, calibration or per-request latency; per field or per tool,
    schema validity with and without the constraint, and decoding speed instead."""
    metrics = report["metrics"]
    test, cascade = metrics["test"], metrics["cascade"]
    breakdown = (section("tools", "Per tool on test", tool_breakdown(test.get("per_tool", {})))
                 if task == "agent" else
                 section("fields", "Per field on test", field_chart(test.get("fields") or {})))
    sections = [
        section("metrics", "Headline metrics",
                structured_metrics_table(report, task) + gates_list(report["gates"])),
        row(breakdown, section("schema", "Schema validity with and without the constraint",
                               schema_chart(task, test, metrics.get("unconstrained", {})))),
    ]
    if task == "agent":
        sections.append(section("depth", "Per depth on test",
                                depth_table(test.get("per_depth", {}))))
    return sections + [
        row(section("cascade", "Coverage and accuracy on validation",
                    coverage_chart(cascade, STRUCTURED_FORCED)),
            section("speed", "Decoding speed at batch 1", speed_section(metrics.get("speed", {})))),
        row(section("routes", "Routes on test", routes_chart(cascade["test"])),
            section("data", "Data funnel", funnel_chart(report["generate"], report["curate"]))),
        section("cost", "Teacher traffic and cost", cost_section(report["generate"],
                                                                 cascade["test"])),
    ]


# --- page structure ---------------------------------------------------------------------------

PAGE = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{title} · distill report</title>
<style>{css}</style>
</head>
<body>
<header>
<h1>{title}</h1>
<p class="description">{description}</p>
<p class="subtitle">{subtitle}</p>
</header>
<main>
{body}
</main>
<footer>Generated by distill-compiler from this bundle's report.json.</footer>
</body>
</html>
"""

CSS = """
body { font: 14px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; color: #0f172a;
       background: #f8fafc; margin: 0; }
header, main, footer { max-width: 1200px; margin: 0 auto; padding: 0 24px; }
header { padding-top: 24px; }
h1 { margin: 0 0 4px; font-size: 26px; }
h2 { margin: 0 0 12px; font-size: 16px; }
.description { margin: 0; color: #334155; }
.subtitle, .note, footer { color: #64748b; font-size: 12px; }
footer { padding-bottom: 24px; }
section { background: #fff; border: 1px solid #e2e8f0; border-radius: 8px; padding: 16px;
          margin: 16px 0; min-width: 0; }
.row { display: grid; grid-template-columns: 1fr 1fr; gap: 16px; }
.row > section { margin: 0; }
.row { margin: 16px 0; }
.charts { display: flex; flex-wrap: wrap; gap: 24px; }
table { border-collapse: collapse; width: 100%; }
th, td { text-align: left; padding: 5px 8px; border-bottom: 1px solid #f1f5f9;
         vertical-align: top; }
th { font-weight: 600; color: #475569; font-size: 12px; }
.num { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
.pass { color: #15803d; font-weight: 600; }
.fail { color: #b91c1c; font-weight: 600; }
.gates { margin: 12px 0 0; padding-left: 18px; }
svg { display: block; max-width: 100%; height: auto; }
svg text { font: 11px system-ui, sans-serif; fill: #334155; }
svg .title { font-size: 12px; font-weight: 600; fill: #0f172a; }
svg .axis { stroke: #94a3b8; }
svg .grid { stroke: #e2e8f0; }
svg .ideal { stroke: #64748b; stroke-dasharray: 4 3; }
svg .target { stroke: #16a34a; stroke-dasharray: 5 3; }
svg .curve { fill: none; stroke: #2563eb; stroke-width: 2; }
svg .marker { fill: #dc2626; stroke: #fff; stroke-width: 1.5; }
svg .gap { stroke: #dc2626; stroke-width: 1; stroke-opacity: 0.6; }
svg .confidence { stroke: #dc2626; stroke-width: 3; }
svg .light { fill: #fff; }
"""


def section(id: str, heading: str, body: str) -> str:
    return f'<section id="{id}"><h2>{esc(heading)}</h2>\n{body}\n</section>'


def row(*sections: str) -> str:
    return '<div class="row">' + "\n".join(sections) + "</div>"


def html_table(header: list[str], rows: list[list[str]], numeric: set[int] = frozenset()) -> str:
    """A table of already-escaped cells; columns in `numeric` are right-aligned."""
    head = "".join(f'<th{" class=num" if i in numeric else ""}>{h}</th>'
                   for i, h in enumerate(header))
    body = "".join("<tr>" + "".join(f'<td{" class=num" if i in numeric else ""}>{c}</td>'
                                    for i, c in enumerate(cells)) + "</tr>" for cells in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def note(text: str) -> str:
    return f'<p class="note">{esc(text)}</p>'


# --- SVG helpers --------------------------------------------------------------------------------

def esc(value) -> str:
    return html.escape(str(value), quote=True)


def attributes(values: dict) -> str:
    return "".join(f' {k.rstrip("_").replace("_", "-")}="{esc(v)}"'
                   for k, v in values.items() if v is not None)


def svg(chart: str, width: float, height: float, label: str, body: list[str]) -> str:
    return (f'<svg data-chart="{chart}" viewBox="0 0 {width:.0f} {height:.0f}" '
            f'width="{width:.0f}" height="{height:.0f}" role="img" aria-label="{esc(label)}">'
            + "".join(body) + "</svg>")


def rect(x, y, w, h, tip: str | None = None, **attrs) -> str:
    title = f"<title>{esc(tip)}</title>" if tip else ""
    return (f'<rect x="{x:.1f}" y="{y:.1f}" width="{max(w, 0):.1f}" height="{max(h, 0):.1f}"'
            f'{attributes(attrs)}>{title}</rect>')


def line(x1, y1, x2, y2, **attrs) -> str:
    return f'<line x1="{x1:.1f}" y1="{y1:.1f}" x2="{x2:.1f}" y2="{y2:.1f}"{attributes(attrs)}/>'


def text(x, y, value, anchor: str = "start", **attrs) -> str:
    return (f'<text x="{x:.1f}" y="{y:.1f}" text-anchor="{anchor}"{attributes(attrs)}>'
            f"{esc(value)}</text>")


def polyline(points: list[tuple[float, float]], **attrs) -> str:
    coords = " ".join(f"{x:.1f},{y:.1f}" for x, y in points)
    return f'<polyline points="{coords}"{attributes(attrs)}/>'


def circle(cx, cy, r, tip: str | None = None, **attrs) -> str:
    title = f"<title>{esc(tip)}</title>" if tip else ""
    return f'<circle cx="{cx:.1f}" cy="{cy:.1f}" r="{r}"{attributes(attrs)}>{title}</circle>'


def shade(color: tuple[int, int, int], strength: float) -> str:
    """`color` mixed into white: 0 is white, 1 is the full colour."""
    strength = min(max(strength, 0.0), 1.0)
    r, g, b = (round(255 + (c - 255) * strength) for c in color)
    return f"rgb({r},{g},{b})"


def rgb(color: tuple[int, int, int]) -> str:
    return shade(color, 1.0)


def clip(label: str, size: int = 18) -> str:
    return label if len(label) <= size else label[:size - 1] + "…"


@dataclass(frozen=True)
class Frame:
    """A chart's plotting area: maps data coordinates to pixels and draws the axes."""

    width: float
    height: float
    x_range: tuple[float, float] = (0.0, 1.0)
    y_range: tuple[float, float] = (0.0, 1.0)
    left: float = 48
    right: float = 16
    top: float = 28
    bottom: float = 40

    def x(self, value: float) -> float:
        lo, hi = self.x_range
        return self.left + (value - lo) / ((hi - lo) or 1) * (self.width - self.left - self.right)

    def y(self, value: float) -> float:
        lo, hi = self.y_range
        return (self.height - self.bottom
                - (value - lo) / ((hi - lo) or 1) * (self.height - self.top - self.bottom))

    def axes(self, x_ticks, y_ticks, x_label: str, y_label: str, x_format=str,
             y_format=str) -> list[str]:
        out = []
        for v in y_ticks:
            out.append(line(self.left, self.y(v), self.width - self.right, self.y(v),
                            class_="grid"))
            out.append(text(self.left - 6, self.y(v) + 4, y_format(v), "end"))
        for v in x_ticks:
            out.append(text(self.x(v), self.height - self.bottom + 15, x_format(v), "middle"))
        bottom = self.height - self.bottom
        out.append(line(self.left, bottom, self.width - self.right, bottom, class_="axis"))
        out.append(line(self.left, self.top, self.left, bottom, class_="axis"))
        out.append(text((self.left + self.width - self.right) / 2, self.height - 6, x_label,
                        "middle"))
        out.append(text(12, (self.top + bottom) / 2, y_label, "middle",
                        transform=f"rotate(-90 12 {(self.top + bottom) / 2:.1f})"))
        return out


def ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    return [lo + (hi - lo) * i / n for i in range(n + 1)]


def percent(value: float) -> str:
    return f"{value:.0%}"


# --- sections ---------------------------------------------------------------------------------

def metrics_table(report: dict) -> str:
    metrics = report["metrics"]
    test, cal, cascade = metrics["test"], metrics["calibration"], metrics["cascade"]
    routed, latency, generate = cascade["test"], metrics["latency"], report["generate"]
    size = report["parity"].get("sizes", {}).get("model.onnx")
    gold = (f"{pct(test['accuracy'])} ({test['gold_n']} with gold)" if test["gold_n"]
            else "n/a (no gold labels)")
    rows = [
        ("Agreement with the teacher", pct(test["agreement"]),
         f"student label = teacher label on {test['n']} test examples; macro F1 "
         f"{num(test['macro_f1'])}"),
        ("Accuracy against gold", gold, "only benchmark data carries gold labels"),
        ("Escalation rate", pct(routed["escalation_rate"]),
         "share of test requests sent to the teacher (triggers, always-escalate, low confidence)"),
        ("Accepted accuracy", pct(routed["accepted_accuracy"]),
         f"agreement of the answers the student keeps; threshold {num(cascade['threshold'])}"),
        ("End-to-end accuracy", pct(routed["end_to_end_accuracy"]),
         "with the teacher answering escalations"
         + (f"; {pct(routed['end_to_end_accuracy_gold'])} against gold"
            if routed.get("end_to_end_accuracy_gold") is not None else "")),
        ("ECE before → after", f"{num(cal['ece_before'])} → {num(cal['ece_after'])}",
         f"temperature {num(cal['temperature'])} fitted on validation"),
        ("Latency p50 / p99", f"{num(latency['p50_ms'], 2)} / {num(latency['p99_ms'], 2)} ms",
         f"batch 1, tokenizer + model on CPU, {latency['runs']} runs"),
        ("Model size", megabytes(size) if size else "n/a",
         f"model.onnx, quantization {report['parity'].get('quantize', 'n/a')}"
         + int8_variant(report["parity"])),
        teacher_requests_row(generate),
    ]
    return headline_table(rows)


def teacher_requests_row(generate: dict) -> tuple[str, str, str]:
    return ("Teacher requests",
            f"{generate.get('requests', 0)} paid, {generate.get('cached', 0)} cached",
            f"data cost ${generate.get('cost_usd', 0.0):.2f}")


def headline_table(rows: list[tuple[str, str, str]]) -> str:
    return html_table(["metric", "value", "what it measures"],
                      [[esc(a), esc(b), esc(c)] for a, b, c in rows], numeric={1})


def gates_list(gates: list[dict]) -> str:
    if not gates:
        return note("The spec sets no gates.")
    items = []
    for g in gates:
        op = ">=" if g.get("higher_is_better", g["gate"].startswith("min_")) else "<="
        verdict = ('<span class="pass">pass</span>' if g["passed"]
                   else '<span class="fail">fail</span>')
        items.append(f"<li>{verdict} {esc(g['gate'])}: {esc(g['metric'])} "
                     f"{esc(num(g['value']))} (needs {op} {esc(num(g['limit']))})</li>")
    return '<ul class="gates">' + "".join(items) + "</ul>"


def confusion_chart(confusion: dict | None) -> str:
    """Heatmap of counts: agreement on the diagonal in blue, mistakes in red."""
    if not confusion or not confusion["rows"]:
        return note("No confusion matrix: the test split is empty or predates this report.")
    rows, columns, counts = confusion["rows"], confusion["columns"], confusion["counts"]
    cell = max(22, min(44, 440 // max(len(columns), 1)))
    left, top = 130, 96
    # The column labels lean right at 45°, so the last one needs room beyond the grid.
    width, height = left + cell * len(columns) + 100, top + cell * len(rows) + 28
    hits = [counts[i][j] for i, r in enumerate(rows) for j, c in enumerate(columns) if r == c]
    misses = [counts[i][j] for i, r in enumerate(rows) for j, c in enumerate(columns) if r != c]
    top_hit, top_miss = max(hits, default=0) or 1, max(misses, default=0) or 1
    body = []
    for j, label in enumerate(columns):
        x = left + j * cell + cell / 2
        body.append(text(x, top - 6, clip(label, 16), "start",
                         transform=f"rotate(-45 {x:.1f} {top - 6})"))
    for i, teacher in enumerate(rows):
        y = top + i * cell
        body.append(text(left - 6, y + cell / 2 + 4, clip(teacher), "end"))
        for j, student in enumerate(columns):
            n = counts[i][j]
            diagonal = teacher == student
            strength = n / (top_hit if diagonal else top_miss) if n else 0.0
            fill = shade(BLUE if diagonal else RED, 0.12 + 0.88 * strength) if n else "#f8fafc"
            body.append(rect(left + j * cell, y, cell - 1, cell - 1,
                             tip=f"teacher {teacher} → student {student}: {n}", fill=fill))
            if n:
                body.append(text(left + j * cell + cell / 2, y + cell / 2 + 4, n, "middle",
                                 class_="light" if strength > 0.55 else None))
    body.append(text(left + cell * len(columns) / 2, height - 6,
                     "student label (columns); rows: teacher label", "middle"))
    return svg("confusion", width, height, "confusion matrix", body)


def label_table(per_label: dict) -> str:
    rows = []
    for label, v in per_label.items():
        f1 = v["f1"]
        bar = "" if f1 is None else (
            f'<svg viewBox="0 0 80 10" width="80" height="10" aria-hidden="true">'
            f'{rect(0, 0, 80, 10, fill="#e2e8f0")}{rect(0, 0, 80 * f1, 10, fill=rgb(BLUE))}</svg>')
        rows.append([esc(label), esc(num(v["precision"], 2)), esc(num(v["recall"], 2)),
                     esc(num(f1, 2)), bar, esc(v["support"])])
    return html_table(["label", "precision", "recall", "F1", "", "support"], rows,
                      numeric={1, 2, 3, 5})


def calibration_charts(calibration: dict) -> str:
    before = reliability_chart("reliability-before", calibration["reliability_before"],
                               f"Before (T = 1): ECE {num(calibration['ece_before'])}")
    after = reliability_chart("reliability-after", calibration["reliability_after"],
                              f"After (T = {num(calibration['temperature'], 2)}): "
                              f"ECE {num(calibration['ece_after'])}")
    return (f'<div class="charts">{before}{after}</div>'
            + note("Bars: accuracy of the test examples in each confidence bin; red tick: their "
                   "mean confidence, joined to the bar by the gap; dashed: perfect calibration. "
                   "Hover a bar for counts."))


def reliability_chart(chart: str, bins: list[dict], title: str) -> str:
    frame = Frame(540, 300)
    body = frame.axes(ticks(0, 1), ticks(0, 1), "confidence", "accuracy", percent, percent)
    body.append(text(frame.left, 16, title, class_="title"))
    for b in bins:
        if not b["count"]:
            continue
        x, w = frame.x(b["lo"]) + 1, frame.x(b["hi"]) - frame.x(b["lo"]) - 2
        tip = (f"{b['lo']:.2f}–{b['hi']:.2f}: {b['count']} examples, accuracy "
               f"{b['accuracy']:.0%}, mean confidence {b['confidence']:.0%}")
        body.append(rect(x, frame.y(b["accuracy"]), w, frame.y(0) - frame.y(b["accuracy"]),
                         tip=tip, fill=rgb(BLUE)))
        mid, conf = x + w / 2, frame.y(b["confidence"])
        body.append(line(mid, frame.y(b["accuracy"]), mid, conf, class_="gap"))
        body.append(line(x, conf, x + w, conf, class_="confidence"))
    body.append(line(frame.x(0), frame.y(0), frame.x(1), frame.y(1), class_="ideal"))
    return svg(chart, frame.width, frame.height, title, body)


def coverage_chart(cascade: dict, forced: str = CLASSIFY_FORCED) -> str:
    """Accepted accuracy against coverage as the threshold moves, the fitted point marked."""
    points = [(p["coverage"], p["accuracy"]) for p in cascade["val_curve"]
              if p["coverage"] is not None and p["accuracy"] is not None]
    if not points:
        return note("No validation traffic reached the threshold, so there is no curve.")
    target = cascade["target_accuracy"]
    floor = min([a for _, a in points] + [target])
    y_lo = max(0.0, int(floor * 10 - 0.5) / 10)  # a step of 0.1 below the lowest value
    frame = Frame(540, 320, y_range=(y_lo, 1.0), left=52)
    body = frame.axes(ticks(0, 1), ticks(y_lo, 1.0, 4), "coverage (share answered by the student)",
                      "accepted accuracy", percent, percent)
    body.append(line(frame.x(0), frame.y(target), frame.x(1), frame.y(target), class_="target"))
    body.append(text(frame.x(0) + 4, frame.y(target) - 5, f"target {target:.0%}",
                     fill=rgb(GREEN)))
    body.append(polyline([(frame.x(c), frame.y(a)) for c, a in points], class_="curve"))
    if cascade["reached"]:
        cx, cy = frame.x(cascade["val_coverage"]), frame.y(cascade["val_accepted_accuracy"])
        label = (f"threshold {cascade['threshold']:.3f}: {cascade['val_coverage']:.0%} "
                 f"answered at {cascade['val_accepted_accuracy']:.1%}")
        body.append(circle(cx, cy, 5, tip=label, class_="marker"))
        # In the top margin rather than beside the point, where the curve and target run.
        body.append(circle(frame.left + 6, 12, 5, class_="marker"))
        body.append(text(frame.left + 16, 16, label, class_="title"))
    chart = svg("coverage", frame.width, frame.height, "coverage–accuracy curve", body)
    return chart + note(f"{cascade['explanation']}. The curve ignores {forced}, which go to "
                        "the teacher at any threshold.")


def out_of_scope_section(ood: dict, target: float) -> str:
    """The detector's figures, and the cascade's accepted accuracy as live traffic brings more
    out-of-scope queries than validation held."""
    points = [(p["share"], p["accepted_accuracy"]) for p in ood["curve"]
              if p["accepted_accuracy"] is not None]
    val, test = ood["val"]["in_scope"] or {}, ood["test"]
    facts = [f"detector: {esc(ood['detector'] or 'none')} ({esc(ood['why'])})",
             (f"false out-of-scope rate: {pct(val.get('out_of_scope'))} on in-scope validation, "
              f"{pct(test['false_rate'])} on test (allowed {ood['max_false_out_of_scope']:.1%})"),
             (f"out-of-scope recall on test: {pct(test['recall'])}{esc(recall_by_cohort(test))}; "
              f"AUROC {num(test['auroc'])}"),
             (f"policy.json size of the detector: {ood['policy_bytes'] / 1e3:.1f} kB; "
              f"cost {num(ood['score_ms_per_request'])} ms per request")]
    if ood.get("expected"):
        e = ood["expected"]
        facts.append(f"at the expected out-of-scope share {e['share']:.0%}: accepted accuracy "
                     f"{pct(e['accepted_accuracy'])}, escalation {pct(e['escalation_rate'])}, "
                     f"cascade cost per 1k requests {num(e['cascade_usd_per_1k'])} USD")
    listing = "<ul>" + "".join(f"<li>{f}</li>" for f in facts) + "</ul>"
    if not points:
        return listing
    floor = min([a for _, a in points] + [target])
    y_lo = max(0.0, int(floor * 10 - 0.5) / 10)
    x_hi = max(s for s, _ in points) or 1.0
    frame = Frame(540, 300, x_range=(0.0, x_hi), y_range=(y_lo, 1.0), left=52)
    body = frame.axes(ticks(0, x_hi), ticks(y_lo, 1.0, 4), "out-of-scope share of traffic",
                      "accepted accuracy", percent, percent)
    body.append(line(frame.x(0), frame.y(target), frame.x(x_hi), frame.y(target), class_="target"))
    body.append(text(frame.x(0) + 4, frame.y(target) - 5, f"target {target:.0%}", fill=rgb(GREEN)))
    body.append(polyline([(frame.x(s), frame.y(a)) for s, a in points], class_="curve"))
    chart = svg("out-of-scope", frame.width, frame.height, "accepted accuracy against the "
                "out-of-scope share", body)
    basis = ("measured on the out-of-scope validation queries" if ood["projection_basis"] == "measured"
             else "worst case: the logs held no out-of-scope queries, so every one the detector "
                  "misses is counted as a wrong answer")
    return listing + chart + note(f"Out-of-scope outcomes {basis}; in-scope outcomes measured on "
                                  "validation with the shipped policy.")


def latency_chart(latency: dict) -> str:
    """Histogram of the per-request samples up to a little past p99; slower outliers are
    counted in the note rather than stretching the axis."""
    samples = latency.get("samples_ms")
    if not samples:
        return note("Latency was not measured (no test or validation texts).")
    lo, hi = min(samples), min(max(samples), latency["p99_ms"] * 1.25)
    width = (hi - lo) / LATENCY_BINS or 1.0
    counts = [0] * LATENCY_BINS
    for t in samples:
        if t <= hi:
            counts[min(int((t - lo) / width), LATENCY_BINS - 1)] += 1
    y_ticks = nice_ticks(max(counts))
    frame = Frame(540, 320, x_range=(lo, lo + width * LATENCY_BINS), y_range=(0, y_ticks[-1]),
                  left=52)
    body = frame.axes(ticks(lo, lo + width * LATENCY_BINS), y_ticks, "milliseconds", "requests",
                      lambda v: f"{v:.1f}", lambda v: f"{v:.0f}")
    for i, n in enumerate(counts):
        a = lo + i * width
        body.append(rect(frame.x(a) + 0.5, frame.y(n), frame.x(a + width) - frame.x(a) - 1,
                         frame.y(0) - frame.y(n), tip=f"{a:.2f}–{a + width:.2f} ms: {n}",
                         fill=rgb(BLUE)))
    for name, key, dy in (("p50", "p50_ms", 0), ("p99", "p99_ms", 14)):
        x = frame.x(latency[key])
        body.append(line(x, frame.top, x, frame.y(0), stroke=rgb(RED), stroke_dasharray="4 3"))
        body.append(text(x + 4, frame.top + 10 + dy, f"{name} {latency[key]:.2f} ms",
                         fill=rgb(RED)))
    slower = sum(t > hi for t in samples)
    tail = (f" {slower} slower request{'s' if slower != 1 else ''} (up to {max(samples):.1f} ms) "
            "fall past the axis." if slower else "")
    chart = svg("latency", frame.width, frame.height, "latency histogram", body)
    return chart + note(f"{latency['runs']} single requests (tokenizer + model) on the build "
                        f"machine's CPU; mean {num(latency['mean_ms'], 2)} ms.{tail}")


def nice_ticks(top: int, most: int = 5) -> list[int]:
    """Ticks for a count axis: 0 to a round number at or above `top`, in whole steps of
    1, 2 or 5 × 10^k."""
    top = max(top, 1)
    magnitude = 10 ** max(math.floor(math.log10(top / most)), 0)
    step = next(m * magnitude for m in (1, 2, 5, 10) if top / (m * magnitude) <= most)
    return [step * i for i in range(math.ceil(top / step) + 1)]


def hbar_chart(chart: str, rows: list[tuple[str, list[tuple[float, float, tuple, str]]]],
               scale: float, value_format, label_width: int = 170,
               value_width: int = 64) -> str:
    """Horizontal bars: each row is (label, [(start, end, colour, tip), ...]) in data units,
    with value_format(bars) written in the `value_width` pixels right of the longest bar."""
    width, row_height = 540, 26
    frame = Frame(width, 24 + row_height * len(rows), x_range=(0, scale or 1), left=label_width,
                  right=value_width, top=8, bottom=16)
    body = []
    for i, (label, bars) in enumerate(rows):
        y = frame.top + i * row_height
        body.append(text(label_width - 8, y + 15, clip(label, 26), "end"))
        height = (row_height - 8) / len(bars)
        for k, (start, end, color, tip) in enumerate(bars):
            body.append(rect(frame.x(start), y + k * height, frame.x(end) - frame.x(start),
                             height - 1, tip=tip, fill=rgb(color)))
        end = max(e for _, e, _, _ in bars)
        body.append(text(frame.x(end) + 6, y + 15, value_format(bars)))
    body.append(line(frame.left, frame.top - 2, frame.left, frame.height - frame.bottom + 2,
                     class_="axis"))
    return svg(chart, frame.width, frame.height, chart, body)


def cohort_chart(per_cohort: dict) -> str:
    if not per_cohort:
        return note("No test examples.")
    rows = []
    for cohort, v in per_cohort.items():
        bars = [(0.0, v["agreement"] or 0.0, BLUE,
                 f"{cohort}: agreement {pct(v['agreement'])} on {v['n']}")]
        if v["accuracy"] is not None:
            bars.append((0.0, v["accuracy"], GREEN,
                         f"{cohort}: gold accuracy {pct(v['accuracy'])}"))
        rows.append((f"{cohort} (n={v['n']})", bars))
    chart = hbar_chart("cohorts", rows, 1.0, lambda bars: " / ".join(pct(e) for _, e, _, _ in bars))
    has_gold = any(v["accuracy"] is not None for v in per_cohort.values())
    return chart + note("Blue: agreement with the teacher" + ("; green: accuracy against gold."
                                                              if has_gold else "."))


def funnel_chart(generate: dict, curate: dict) -> str:
    """From what generate produced to what each split holds, one bar per curate rule."""
    produced = curate.get("generated", 0)
    rows = [("produced", [(0.0, produced, BLUE, f"{produced} examples from generate")])]
    remaining = produced
    for rule, dropped in sorted(curate.get("dropped", {}).items()):
        n = dropped["count"]
        rows.append((f"dropped: {rule}", [(remaining - n, remaining, RED, f"{rule}: -{n}")]))
        remaining -= n
    rows.append(("kept", [(0.0, curate.get("kept", remaining), GREEN, "kept after curation")]))
    splits = curate.get("splits", {})
    for split in sorted(splits, key=lambda s: (SPLIT_ORDER.get(s, len(SPLIT_ORDER)), s)):
        n = splits[split]
        rows.append((f"split: {split}", [(0.0, n, GREY, f"{split}: {n}")]))
    scale = max(max(end for _, bars in rows for _, end, _, _ in bars), 1)
    chart = hbar_chart("funnel", rows, scale,
                       lambda bars: f"{bars[0][1] - bars[0][0]:.0f}")
    details = [f"Sources: {mapping(generate.get('by_source'))}",
               f"cohorts: {mapping(generate.get('by_cohort'))}"]
    if generate.get("rejected"):
        details.append(f"teacher outputs rejected before curation: {mapping(generate['rejected'])}")
    if generate.get("pool"):
        details.append(pool_selection(generate))
    if failure_rounds(generate):
        details.append(failure_rounds(generate))
    if curate.get("pii_scrubbed"):
        details.append(f"PII scrubbed: {mapping(curate['pii_scrubbed'])}")
    return chart + note("; ".join(details) + ". Train includes noise copies, so splits can "
                        "add up to more than kept.")


def confusable_table(pairs: list[dict] | None) -> str:
    """The intent pairs that got hard negatives: named in the spec, or found nearest in
    embedding space before training (with their cosine)."""
    if not pairs:
        return ""
    rows = [[esc(" ~ ".join(p["pair"])),
             esc(p["source"] if p["source"] == "named" else f"found, cosine {p['cosine']:.3f}"),
             esc(p["examples"])] for p in pairs]
    return (note("Confusable pairs: hard negatives generated between intents named in "
                 "confusable_with or found nearest in embedding space.")
            + html_table(["pair", "source", "hard negatives"], rows, numeric={2}))


def mapping(counts: dict | None) -> str:
    return ", ".join(f"{k} {v}" for k, v in sorted((counts or {}).items())) or "none"


def cost_section(generate: dict, routed: dict) -> str:
    """Classify's evaluate prices the cascade (routed["cost"]); extract and agent count the
    teacher calls only, which follow from the escalation rate."""
    priced = "cost" in routed
    rate = routed.get("escalation_rate")
    cost = routed["cost"] if priced else {
        "teacher_calls_per_1k": None if rate is None else 1000 * rate, "teacher_cost_known": False}
    calls = cost["teacher_calls_per_1k"]
    known = cost["teacher_cost_known"]
    rows = [
        ["Teacher requests paid to build the data", esc(generate.get("requests", 0))],
        ["Reused from the request cache", esc(generate.get("cached", 0))],
        ["Tokens (prompt / completion)",
         esc(f"{generate.get('prompt_tokens', 0)} / {generate.get('completion_tokens', 0)}")],
        ["Data cost", esc(f"${generate.get('cost_usd', 0.0):.2f}")],
        ["Teacher calls per 1,000 requests in service", esc(num(calls, 0))],
        ["Cost per 1,000 requests: cascade / teacher alone",
         esc(f"${cost['cascade_usd_per_1k']:.3f} / ${cost['all_teacher_usd_per_1k']:.3f}")
         if known and calls is not None else "unknown"],
    ]
    table = html_table(["", "value"], rows, numeric={1})
    if calls is None:
        return table
    chart = hbar_chart("cost", [
        ("teacher alone", [(0.0, 1000.0, GREY, "every request goes to the teacher")]),
        ("cascade", [(0.0, calls, BLUE, "escalated requests only")]),
    ], 1000.0, lambda bars: f"{bars[0][1]:.0f} calls", label_width=110)
    why = ("" if known else
           " Cost is unknown because the teacher's traffic was replayed from logs." if priced else
           " Evaluate does not price escalated answers for this task, only counts them.")
    return f'<div class="row"><div>{table}</div><div>{chart}</div></div>' + note(
        "Teacher calls per 1,000 service requests, on the test split's routes." + why)



# --- extract and agent ------------------------------------------------------------------------

def structured_metrics_table(report: dict, task: str) -> str:
    metrics = report["metrics"]
    test, cascade, parity = metrics["test"], metrics["cascade"], report["parity"]
    routed = cascade["test"]
    speed = (metrics.get("speed") or {}).get("constrained") or {}
    free = (metrics.get("unconstrained") or {}).get("schema_validity")
    size = parity.get("sizes", {}).get("model.onnx")
    if task == "extract":
        fields = test.get("fields") or {}
        gold = (f"{pct(test.get('accuracy'))} ({test['gold_n']} with gold)" if test.get("gold_n")
                else "n/a (no gold objects)")
        rows = [
            ("Agreement with the teacher", pct(test["agreement"]),
             f"the whole object equals the teacher's on {test['n']} test answers"),
            ("Field F1", num(fields.get("f1")),
             f"micro over leaf values; precision {num(fields.get('precision'))}, recall "
             f"{num(fields.get('recall'))}"),
            ("Accuracy against gold", gold, "only benchmark data carries gold objects"),
        ]
        validity = "answers that validate against the output schema"
    else:
        arguments = test.get("arguments") or {}
        rows = [
            ("Agreement with the teacher", pct(test["agreement"]),
             f"the same tool calls, or a text reply where the teacher replied in text, on "
             f"{test['n']} test turns"),
            ("Tool-name accuracy", pct(test.get("tool_name_accuracy")),
             f"the same tools in the same order, on the {test.get('call_turns', 0)} turns where "
             "the teacher called"),
            ("Call exact match", pct(test.get("call_exact_match")),
             "the same calls with canonically equal arguments, on those turns"),
            ("Argument F1", num(arguments.get("f1")),
             f"micro over (tool, argument, value) triples; precision "
             f"{num(arguments.get('precision'))}, recall {num(arguments.get('recall'))}"),
            ("Call decision accuracy", pct(test.get("call_decision_accuracy")),
             f"a tool call exactly when the teacher made one; {test.get('missed_calls', 0)} "
             f"missed, {test.get('spurious_calls', 0)} spurious"),
        ]
        validity = "tool calls whose arguments validate against the tool's schema"
    rows += [
        ("Schema validity constrained / unconstrained", f"{pct(test['schema_validity'])} / "
                                                        f"{pct(free)}",
         f"{validity}: what ships / plain greedy decoding of the same model"),
        ("Escalation rate", pct(routed.get("escalation_rate")),
         "share of test requests sent to the teacher (triggers, truncated answers, low "
         "confidence)"),
        ("Accepted accuracy", pct(routed.get("accepted_accuracy")),
         f"agreement of the answers the student keeps; threshold {num(cascade['threshold'])}"),
        ("End-to-end accuracy", pct(routed.get("end_to_end_accuracy")),
         "with the teacher answering escalations"),
        ("Decoding speed", f"{num(speed.get('tokens_per_second'), 0)} tokens/s",
         f"constrained, batch 1 on CPU; answer p50 / p99 {num(speed.get('answer_p50_ms'), 1)} / "
         f"{num(speed.get('answer_p99_ms'), 1)} ms"),
        ("Model size", megabytes(size) if size else "n/a",
         f"model.onnx, quantization {parity.get('quantize', 'n/a')}; greedy outputs equal the "
         f"trained model's on {pct(parity.get('shipped_agreement'))} of "
         f"{parity.get('n', 'n/a')} validation prompts"),
        teacher_requests_row(report["generate"]),
    ]
    return headline_table(rows)


def field_chart(fields: dict) -> str:
    per_field = fields.get("per_field") or {}
    if not per_field:
        return note("No test answers, so no field was scored.")
    rows = [(f"{path} (n={v['support']})",
             [(0.0, v["f1"] or 0.0, BLUE,
               f"{path}: precision {num(v['precision'])}, recall {num(v['recall'])}, F1 "
               f"{num(v['f1'])} on {v['support']} teacher values")])
            for path, v in per_field.items()]
    chart = hbar_chart("fields", rows, 1.0, lambda bars: num(bars[0][1], 2))
    return chart + note(
        f"F1 per leaf field against the teacher's objects (micro over all fields "
        f"{num(fields.get('f1'))}); a.b is a nested field, a[] an array element taken whole; n "
        "counts the teacher's values. Hover a bar for precision and recall.")


def tool_breakdown(per_tool: dict) -> str:
    if not per_tool:
        return note("The teacher called no tool on test, so no tool was scored.")
    rows = [(f"{name} (n={v['call_turns']})",
             [(0.0, v["tool_name_accuracy"] or 0.0, GREY,
               f"{name}: tool-name accuracy {pct(v['tool_name_accuracy'])}"),
              (0.0, v["call_exact_match"] or 0.0, BLUE,
               f"{name}: call exact match {pct(v['call_exact_match'])}")])
            for name, v in per_tool.items()]
    chart = hbar_chart("tools", rows, 1.0,
                       lambda bars: " / ".join(percent(e) for _, e, _, _ in bars),
                       value_width=84)
    details = html_table(
        ["tool", "turns", "tool name", "exact match", "argument F1", "valid calls"],
        [[esc(name), esc(v["call_turns"]), esc(pct(v["tool_name_accuracy"])),
          esc(pct(v["call_exact_match"])), esc(num(v["arguments"]["f1"], 2)),
          esc(pct(v["schema_validity"]))] for name, v in per_tool.items()],
        numeric={1, 2, 3, 4, 5})
    return chart + details + note(
        "Grey: tool-name accuracy; blue: call exact match, over the test turns where the teacher "
        "called the tool (n; a turn calling two tools counts under both). Valid calls: the "
        "student's calls on those turns whose arguments validate against the called tool's "
        "schema.")


def schema_chart(task: str, test: dict, unconstrained: dict) -> str:
    measured = [(label, value, color) for label, value, color in
                (("constrained", test.get("schema_validity"), GREEN),
                 ("unconstrained", unconstrained.get("schema_validity"), RED))
                if value is not None]
    if task == "extract":
        what = (f"Share of the {test['n']} test answers that parse and validate against the "
                f"output schema; parsed as JSON with the constraint: {pct(test.get('parsed'))}.")
    else:
        what = (f"Share of the student's tool calls whose arguments validate against the called "
                f"tool's schema ({test.get('student_calls', 0)} calls with the constraint).")
    if not measured:
        return note(what + " Nothing was measured.")
    chart = hbar_chart("schema", [(label, [(0.0, value, color, f"{label}: {pct(value)}")])
                                  for label, value, color in measured],
                       1.0, lambda bars: pct(bars[0][1]), label_width=110)
    return chart + note(what + " Constrained is what ships; unconstrained is plain greedy "
                        "decoding of the same model, which shows what the constraint buys.")


def depth_table(per_depth: dict) -> str:
    if not per_depth:
        return note("No test turns.")
    rows = [[esc(depth), esc(v["n"]), esc(pct(v["agreement"])),
             esc(pct(v["call_decision_accuracy"])), esc(pct(v["tool_name_accuracy"])),
             esc(pct(v["call_exact_match"])), esc(num(v["arguments"]["f1"], 2)),
             esc(num(v["text_token_f1"], 2))] for depth, v in per_depth.items()]
    return html_table(["depth", "turns", "agreement", "call decision", "tool name",
                       "exact match", "argument F1", "text token F1"], rows,
                      numeric=set(range(1, 8))) + note(
        "Depth: assistant turns earlier in the conversation. Tool name and exact match are over "
        "the turns where the teacher called a tool; text token F1 over its text replies.")


def speed_section(speed: dict) -> str:
    modes = [(label, speed.get(key) or {}) for label, key in
             (("constrained (ships)", "constrained"), ("unconstrained", "unconstrained"))]
    table = html_table(
        ["decoding", "tokens/s", "answer p50", "answer p99", "mean tokens"],
        [[esc(label), esc(num(v.get("tokens_per_second"), 0)),
          esc(f"{num(v.get('answer_p50_ms'), 1)} ms"), esc(f"{num(v.get('answer_p99_ms'), 1)} ms"),
          esc(num(v.get("mean_tokens"), 1))] for label, v in modes],
        numeric={1, 2, 3, 4})
    measured = [(label, v["tokens_per_second"]) for label, v in modes
                if v.get("tokens_per_second") is not None]
    chart = hbar_chart("speed", [(label, [(0.0, tps, BLUE, f"{label}: {tps:.0f} tokens/s")])
                                 for label, tps in measured],
                       max((tps for _, tps in measured), default=1.0),
                       lambda bars: f"{bars[0][1]:.0f} tok/s", label_width=140) if measured else ""
    return table + chart + note(
        "Greedy decoding with the KV cache at batch 1, onnxruntime on the build machine's CPU, "
        "over the test answers; an answer's latency runs from its prompt to its last token.")


def routes_chart(routed: dict) -> str:
    routes, rules = routed.get("routes") or {}, routed.get("escalations_by_rule") or {}
    if not routes:
        return note("No test requests.")
    colors = {"student": BLUE, "teacher": GREY, "refusal": GREEN}
    rows = [(route, [(0.0, n, colors.get(route, GREY), f"{route}: {n}")])
            for route, n in routes.items()]
    rows += [(f"escalated: {rule}", [(0.0, n, RED, f"{rule}: {n}")]) for rule, n in rules.items()]
    chart = hbar_chart("routes", rows, max(n for _, bars in rows for _, n, _, _ in bars),
                       lambda bars: f"{bars[0][1]:.0f}")
    return chart + note(f"Test requests by route at the fitted threshold; escalations by the "
                        f"rule that sent them ({pct(routed.get('escalation_rate'))} escalated).")
