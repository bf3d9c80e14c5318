"""`distill diff` on two hand-made report.json files: exact deltas, regression flags, gates and
exit codes, through the library and the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from cli_runner import cli

from distill_compiler.errors import UsageError
from distill_compiler.report import diff


def report(agreement, escalation, ece, p50, size, f1: dict, gates=()) -> dict:
    return {
        "metrics": {
            "test": {"agreement": agreement, "accuracy": None, "macro_f1": 0.8,
                     "per_label": {label: {"f1": v} for label, v in f1.items()}},
            "cascade": {"test": {"escalation_rate": escalation, "accepted_accuracy": 0.95,
                                 "end_to_end_accuracy": 0.98}},
            "calibration": {"ece_after": ece},
            "latency": {"p50_ms": p50, "p99_ms": 2 * p50},
        },
        "parity": {"sizes": {"model.onnx": size}},
        "gates": list(gates),
    }


GATE = {"gate": "min_teacher_agreement", "metric": "agreement", "limit": 0.85,
        "higher_is_better": True}


@pytest.fixture
def builds(tmp_path) -> tuple[Path, Path]:
    """A as a build directory (bundle/report.json), B as a bundle directory (report.json)."""
    a, b = tmp_path / "a" / "bundle", tmp_path / "b"
    a.mkdir(parents=True)
    b.mkdir()
    (a / "report.json").write_text(json.dumps(report(
        0.90, 0.30, 0.050, 10.0, 1_000_000, {"billing": 0.90, "refund": 0.80, "other": 0.70})))
    (b / "report.json").write_text(json.dumps(report(
        0.88, 0.25, 0.055, 11.0, 1_200_000, {"billing": 0.90, "refund": 0.85, "shipping": 0.60},
        gates=[{**GATE, "value": 0.88, "passed": True}])))
    return tmp_path / "a", b


def by_name(changes) -> dict:
    return {c.name: c for c in changes}


def test_deltas_and_flags(builds):
    a, b = builds
    result = diff.compare(diff.load_report(a), diff.load_report(b))
    m = by_name(result.metrics)
    assert m["agreement"].delta == pytest.approx(-0.02) and m["agreement"].regression
    assert m["escalation_rate"].delta == pytest.approx(-0.05)
    assert m["escalation_rate"].worse_by == 0.0 and not m["escalation_rate"].regression
    # ECE is lower-is-better: +0.005 is worse, but within the 0.01 tolerance.
    assert m["ece_after"].worse_by == pytest.approx(0.005) and not m["ece_after"].regression
    # Latency and size are relative: +10% latency is under 25%, +20% size is over 1%.
    assert m["latency_p50_ms"].worse_by == pytest.approx(0.10)
    assert not m["latency_p50_ms"].regression
    assert m["model_bytes"].delta == 200_000 and m["model_bytes"].regression
    assert m["accuracy"].delta is None and not m["accuracy"].regression  # no gold in either
    labels = by_name(result.labels)
    assert list(labels) == ["billing", "refund", "other", "shipping"]
    assert labels["refund"].delta == pytest.approx(0.05) and not labels["refund"].regression
    assert labels["other"].b is None and not labels["other"].regression  # label gone from B
    assert labels["shipping"].a is None  # new in B
    assert [c.name for c in result.regressions] == ["agreement", "model_bytes"]
    assert result.exit_code(fail_on_regression=False) == 0
    assert result.exit_code(fail_on_regression=True) == 1


def test_tolerance_decides_what_is_a_regression(builds):
    a, b = builds
    loose = diff.compare(diff.load_report(a), diff.load_report(b), tolerance=0.25,
                         latency_tolerance=0.05)
    assert [c.name for c in loose.regressions] == ["latency_p50_ms", "latency_p99_ms"]


def test_a_gate_b_fails_exits_1_without_asking(builds):
    a, b = builds
    data = json.loads((b / "report.json").read_text())
    data["gates"] = [{**GATE, "value": 0.84, "passed": True}]  # rechecked, not trusted
    (b / "report.json").write_text(json.dumps(data))
    result = diff.compare(diff.load_report(a), diff.load_report(b))
    assert [g["gate"] for g in result.failed_gates] == ["min_teacher_agreement"]
    assert result.exit_code(fail_on_regression=False) == 1


def test_gate_direction_falls_back_to_the_gate_name():
    assert diff.gate_passes({"gate": "max_escalation_rate", "limit": 0.3, "value": 0.2})
    assert not diff.gate_passes({"gate": "max_escalation_rate", "limit": 0.3, "value": 0.4})
    assert not diff.gate_passes({"gate": "min_teacher_agreement", "limit": 0.8, "value": None})


def test_cli_table_json_and_exit_codes(builds, capsys):
    a, b = builds
    assert cli("diff", a, b) == 0
    table = capsys.readouterr().out
    assert "agreement" in table and "-0.020" in table and "worse" in table
    assert "gate min_teacher_agreement: pass" in table
    assert "regressions: agreement, model_bytes" in table
    assert cli("diff", a, b, "--fail-on-regression") == 1
    capsys.readouterr()
    assert cli("diff", a, b / "report.json", "--json", "--tolerance", "0.1") == 0
    data = json.loads(capsys.readouterr().out)
    # -0.02 agreement is within 0.1 now; +20% size is not.
    assert data["regressions"] == ["model_bytes"] and data["failed_gates"] == []
    assert data["metrics"][0] == {"name": "agreement", "a": 0.90, "b": 0.88,
                                  "delta": pytest.approx(-0.02), "worse_by": pytest.approx(0.02),
                                  "regression": False}
    assert data["gates"][0]["passed"] is True


def test_a_directory_without_a_report_is_a_usage_error(builds, tmp_path, capsys):
    a, _ = builds
    with pytest.raises(UsageError, match="no report.json"):
        diff.load_report(tmp_path)
    assert cli("diff", a, tmp_path) == 2
    assert "give a build directory" in capsys.readouterr().err
