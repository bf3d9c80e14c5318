"""report.html: every section and chart present, for classify, extract and agent bundles; nothing
fetched from elsewhere, data escaped; and (opt-in, -m slow) the page rendered by a real headless
Chromium."""

from __future__ import annotations

import importlib.util
import shutil
from html.parser import HTMLParser
from pathlib import Path

import pytest
from causal_reports import build

from distill_compiler.report import html as report_html

HOSTILE = "<script>alert(1)</script>"  # a label, cohort and rule name that must stay text
ROOT = Path(__file__).resolve().parents[2]


def sample_report() -> dict:
    """A report.json as the bundle stage writes it, small enough to check by eye."""
    labels = ["billing", HOSTILE, "out_of_scope"]
    bins = [{"lo": i / 15, "hi": (i + 1) / 15, "count": 0, "confidence": None, "accuracy": None}
            for i in range(15)]
    bins[13] = {**bins[13], "count": 6, "confidence": 0.9, "accuracy": 0.83}
    bins[14] = {**bins[14], "count": 4, "confidence": 0.97, "accuracy": 1.0}
    per_label = {label: {"precision": 0.9, "recall": 0.8, "f1": 0.85, "support": 3}
                 for label in labels}
    return {
        "metrics": {
            "n": {"val": 10, "test": 10}, "labels": labels,
            "test": {"n": 10, "agreement": 0.8, "accuracy": 0.75, "gold_n": 4, "macro_f1": 0.85,
                     "per_label": per_label,
                     "confused_pairs": [{"target": HOSTILE, "predicted": "billing", "count": 2}],
                     "per_cohort": {"log": {"n": 7, "agreement": 0.857, "accuracy": 0.75},
                                    HOSTILE: {"n": 3, "agreement": 0.667, "accuracy": None}},
                     "confusion": {"rows": labels, "columns": labels,
                                   "counts": [[3, 0, 0], [2, 1, 0], [0, 0, 4]]}},
            "calibration": {"temperature": 1.5, "bins": 15, "ece_before": 0.12, "ece_after": 0.04,
                            "reliability_before": bins, "reliability_after": bins},
            "cascade": {"target_accuracy": 0.9, "threshold": 0.8, "reached": True,
                        "explanation": "threshold 0.800 answers 60.0% at 90.0%",
                        "val_accepted_accuracy": 0.9, "val_coverage": 0.6,
                        "val_curve": [{"threshold": t / 10, "coverage": 1 - t / 12,
                                       "accuracy": 0.7 + t / 50} for t in range(11)],
                        "test": {"n": 10, "escalation_rate": 0.3, "accepted_accuracy": 0.95,
                                 "accepted_accuracy_gold": None, "end_to_end_accuracy": 0.97,
                                 "end_to_end_accuracy_gold": 0.9,
                                 "routes": {"student": 7, "teacher": 3},
                                 "escalations_by_rule": {"low_confidence": 3},
                                 "cost": {"teacher_cost_per_request_usd": 0.002,
                                          "teacher_cost_known": True, "teacher_calls_per_1k": 300.0,
                                          "cascade_usd_per_1k": 0.6,
                                          "all_teacher_usd_per_1k": 2.0}}},
            "latency": {"batch": 1, "runs": 6, "p50_ms": 2.0, "p99_ms": 3.0, "mean_ms": 2.2,
                        "samples_ms": [1.5, 2.0, 2.0, 2.1, 3.0, 40.0]},
        },
        "gates": [{"gate": "min_teacher_agreement", "metric": "agreement", "value": 0.8,
                   "limit": 0.85, "higher_is_better": True, "passed": False}],
        "curate": {"generated": 12, "kept": 10,
                   "dropped": {"duplicate": {"count": 1, "examples": []},
                               HOSTILE: {"count": 1, "examples": []}},
                   "splits": {"test": 10, "train": 0, "val": 10}, "pii_scrubbed": {"EMAIL": 1}},
        "generate": {"requests": 40, "cached": 2, "cost_usd": 0.08, "prompt_tokens": 900,
                     "completion_tokens": 120, "by_cohort": {"log": 12}, "by_source": {"log": 12},
                     "rejected": {},
                     "confusable_pairs": [
                         {"pair": ["billing", "refund"], "source": "named", "examples": 40},
                         {"pair": ["refund", "wrong_item"], "source": "found", "cosine": 0.8123,
                          "examples": 38}]},
        "parity": {"quantize": "int8", "sizes": {"model.onnx": 23_418_250}},
        "train": {},
    }


class Page(HTMLParser):
    """What the checks need from a page: tags, attributes and the visible text."""

    def __init__(self, markup: str):
        super().__init__()
        self.tags: list[tuple[str, dict]] = []
        self.text: list[str] = []
        self.feed(markup)

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))

    def handle_data(self, data):
        self.text.append(data)

    def ids(self, attribute: str) -> set[str]:
        return {attrs[attribute] for _, attrs in self.tags if attribute in attrs}


@pytest.fixture(scope="module")
def markup() -> str:
    return report_html.render(sample_report(), "harbor <beta>", "Routes & refuses.")


def test_every_section_and_chart_is_on_the_page(markup):
    page = Page(markup)
    assert page.ids("id") >= {"metrics", "confusion", "labels", "calibration", "cascade",
                              "latency", "cohorts", "data", "cost"}
    assert page.ids("data-chart") == {"confusion", "reliability-before", "reliability-after",
                                      "coverage", "latency", "cohorts", "funnel", "cost"}
    text = " ".join(page.text)
    for figure in ("80.0%", "75.0% (4 with gold)", "30.0%", "95.0%", "0.120 → 0.040",
                   "2.00 / 3.00 ms", "23.4 MB", "40 paid, 2 cached", "$0.600 / $2.000"):
        assert figure in text, figure
    assert "fail" in text and "min_teacher_agreement" in text  # the failed gate is shown
    assert "1 slower request (up to 40.0 ms)" in text  # the outlier is counted, not drawn
    for pair in ("billing ~ refund", "named", "refund ~ wrong_item", "found, cosine 0.812"):
        assert pair in text, pair


@pytest.fixture(scope="module")
def pages(markup) -> dict[str, str]:
    """The page of each task; the causal ones carry markup in their description."""
    out = {"classify": markup}
    for task in ("extract", "agent"):
        spec, _, report = build(task, description="Orders <i>only</i> & nothing else.")
        out[task] = report_html.render(report, spec.name, spec.description)
    return out


@pytest.mark.parametrize("task", ["classify", "extract", "agent"])
def test_the_page_fetches_nothing(pages, task):
    markup = pages[task]
    page = Page(markup)
    assert not [tag for tag, _ in page.tags if tag in ("script", "link", "img", "iframe")]
    references = [value for _, attrs in page.tags for key, value in attrs.items()
                  if key in ("src", "href", "xlink:href", "action")]
    assert references == []
    assert "http://" not in markup and "https://" not in markup and "url(" not in markup


def test_data_strings_are_escaped(markup):
    assert "<script>" not in markup and "harbor <beta>" not in markup
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in markup
    page = Page(markup)
    text = "".join(page.text)
    assert HOSTILE in text  # shown to the reader as the label it is
    assert "harbor <beta>" in text and "Routes & refuses." in text
    tips = [t for t in page.text if t.startswith("teacher <script>")]
    assert tips == [f"teacher {HOSTILE} → student billing: 2",
                    f"teacher {HOSTILE} → student {HOSTILE}: 1",
                    f"teacher {HOSTILE} → student out_of_scope: 0"]


CAUSAL_SECTIONS = {"metrics", "schema", "cascade", "speed", "routes", "data", "cost"}
CAUSAL_CHARTS = {"schema", "coverage", "speed", "routes", "funnel", "cost"}
CLASSIFY_ONLY = {"confusion", "labels", "calibration", "latency", "cohorts"}


def test_agent_page_scores_tools_depths_and_the_constraint(pages):
    page = Page(pages["agent"])
    ids = page.ids("id")
    assert ids >= CAUSAL_SECTIONS | {"tools", "depth"} and not ids & CLASSIFY_ONLY
    assert page.ids("data-chart") == CAUSAL_CHARTS | {"tools"}
    text = " ".join(page.text)
    for figure in ("agent · 12 test and 12 validation assistant turns",
                   "75.0%",              # agreement: 9 of 12 turns
                   "83.3%", "66.7%",     # tool-name accuracy 5/6, call exact match 4/6
                   "100.0% / 66.7%",     # schema validity constrained / unconstrained
                   "1 missed, 1 spurious", "200 tokens/s", "60.0 / 60.0 ms",
                   "100% / 67%",         # cancel_order's bars: right tool, one wrong reason
                   "cancel_order (n=3)", "escalated: low_confidence",
                   "0.4 MB", "on 83.3% of 6 validation prompts", "30 paid, 4 cached"):
        assert figure in text, figure
    # Per depth: the call turns, then the text replies (no calls to score there).
    assert table_rows(pages["agent"], "depth") == [
        ["0", "6", "66.7%", "83.3%", "83.3%", "66.7%", "0.82", "n/a"],
                    ["1", "6", "83.3%", "83.3%", "n/a", "n/a", "0.00", "0.83"]]
    assert "answers cut short at max_new_tokens" in text


def test_extract_page_scores_fields_and_the_constraint(pages):
    page = Page(pages["extract"])
    ids = page.ids("id")
    assert ids >= CAUSAL_SECTIONS | {"fields"} and not ids & (CLASSIFY_ONLY | {"depth", "tools"})
    assert page.ids("data-chart") == CAUSAL_CHARTS | {"fields"}
    text = " ".join(page.text)
    for figure in ("extract · 10 test and 10 validation answers", "80.0%", "0.933",
                   "100.0% / 90.0%", "n/a (no gold objects)", "issue (n=10)", "0.90",
                   "issue: precision 0.900, recall 0.900, F1 0.900 on 10 teacher values",
                   "20.0%", "200 calls"):
        assert figure in text, figure
    assert "Orders <i>only</i> & nothing else." in text  # shown as text, not markup
    assert "<i>only" not in pages["extract"]


def table_rows(markup: str, section_id: str) -> list[list[str]]:
    """The cell texts of each body row of the first table in a section."""
    section = markup.split(f'<section id="{section_id}">', 1)[1].split("</section>", 1)[0]
    body = section.split("<tbody>", 1)[1].split("</tbody>", 1)[0]
    return [["".join(Page(cell).text) for cell in row.split("</td>")[:-1]]
            for row in body.split("</tr>")[:-1]]


def test_missing_causal_measurements_say_so_instead_of_drawing():
    _, _, report = build("agent")
    metrics = report["metrics"]
    del metrics["speed"]
    metrics["unconstrained"]["schema_validity"] = None
    metrics["test"]["per_tool"] = {}
    metrics["cascade"]["val_curve"] = [{"threshold": 0.0, "coverage": None, "accuracy": None}]
    page = Page(report_html.render(report, "x"))
    assert page.ids("data-chart") == {"schema", "routes", "funnel", "cost"}
    text = " ".join(page.text)
    assert "The teacher called no tool on test" in text and "No validation traffic" in text
    assert "n/a tokens/s" in text


def test_missing_measurements_say_so_instead_of_drawing():
    report = sample_report()
    metrics = report["metrics"]
    metrics["latency"] = {"batch": 1, "runs": 0, "p50_ms": None, "p99_ms": None,
                          "mean_ms": None, "samples_ms": []}
    metrics["cascade"]["reached"] = False
    metrics["cascade"]["val_curve"] = [{"threshold": 0.0, "coverage": None, "accuracy": None}]
    del metrics["test"]["confusion"]  # a report from before evaluate recorded it
    page = Page(report_html.render(report, "x"))
    assert page.ids("data-chart") == {"reliability-before", "reliability-after", "cohorts",
                                      "funnel", "cost"}
    text = " ".join(page.text)
    assert "Latency was not measured" in text and "No confusion matrix" in text


def test_nice_ticks_are_round_and_cover_the_top():
    assert report_html.nice_ticks(28) == [0, 10, 20, 30]
    assert report_html.nice_ticks(72) == [0, 20, 40, 60, 80]
    assert report_html.nice_ticks(3) == [0, 1, 2, 3]
    assert report_html.nice_ticks(2) == [0, 1, 2]  # counts: never half a request


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("chromium") is None,
                    reason="needs a chromium binary (apt-get install chromium); CI has none")
def test_headless_chromium_renders_the_page(markup, tmp_path):
    spec = importlib.util.spec_from_file_location(
        "report_screenshot", ROOT / "benchmarks" / "report_screenshot.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    page = tmp_path / "report.html"
    page.write_text(markup, encoding="utf-8")
    png = module.screenshot(page, tmp_path / "report.png", 1280, 1600)
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    # A blank page compresses to a few kB; the charts and tables make it far larger.
    assert len(data) > 50_000


def test_the_int8_variant_that_shipped_is_named_with_its_parity_and_latency():
    report = sample_report()
    report["parity"]["int8"] = {
        "mode": "auto", "variant": "static-minmax", "latency_p50_ms": 4.125, "fp32_matmuls": [],
        "tried": [{"variant": "dynamic", "agreement": 0.986, "latency_ms": 5.2},
                  {"variant": "static-minmax", "agreement": 0.993, "latency_ms": 4.125}]}
    text = " ".join(Page(report_html.render(report, "banking", "")).text)
    assert ("quantization int8, variant static-minmax (int8_mode auto; batch-1 p50 4.12 ms at "
            "export; tried dynamic 98.6%, static-minmax 99.3%)") in text
