"""`distill diff A B`: what changed between two builds' report.json, and whether B may ship.

Meant for CI when a spec changes: build the old and the new spec, diff them, and fail on a
gate B does not pass or, with --fail-on-regression, on any metric that got worse by more than
the tolerance. Rates (agreement, accuracy, escalation, ECE, per-label F1) are compared in
absolute points, so `tolerance=0.01` lets a rate move one point the wrong way; latency and
model size are compared relative to A, because their scale depends on the model and machine.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

from ..errors import EXIT_OK, EXIT_STAGE_FAILED, UsageError

DEFAULT_TOLERANCE = 0.01
# Batch-1 latency on a shared CPU moves by tens of percent between identical runs.
DEFAULT_LATENCY_TOLERANCE = 0.25


@dataclass(frozen=True)
class Metric:
    name: str
    path: tuple[str, ...]  # keys into report.json
    higher_is_better: bool
    relative: bool = False  # compare the change as a fraction of A's value
    latency: bool = False  # uses the latency tolerance


METRICS = (
    Metric("agreement", ("metrics", "test", "agreement"), True),
    Metric("accuracy", ("metrics", "test", "accuracy"), True),
    Metric("macro_f1", ("metrics", "test", "macro_f1"), True),
    Metric("escalation_rate", ("metrics", "cascade", "test", "escalation_rate"), False),
    Metric("accepted_accuracy", ("metrics", "cascade", "test", "accepted_accuracy"), True),
    Metric("end_to_end_accuracy", ("metrics", "cascade", "test", "end_to_end_accuracy"), True),
    Metric("ece_after", ("metrics", "calibration", "ece_after"), False),
    Metric("latency_p50_ms", ("metrics", "latency", "p50_ms"), False, relative=True, latency=True),
    Metric("latency_p99_ms", ("metrics", "latency", "p99_ms"), False, relative=True, latency=True),
    Metric("model_bytes", ("parity", "sizes", "model.onnx"), False, relative=True),
)


@dataclass(frozen=True)
class Change:
    """One figure in A and B; `worse_by` is how far B moved the wrong way (0 if it did not), in
    the figure's units or, for latency and size, as a fraction of A."""

    name: str
    a: float | None
    b: float | None
    delta: float | None
    worse_by: float | None
    regression: bool


@dataclass(frozen=True)
class Diff:
    a: str
    b: str
    metrics: list[Change]
    labels: list[Change]  # per-label F1 on test
    gates: list[dict]  # B's gates as its bundle recorded them

    @property
    def regressions(self) -> list[Change]:
        return [c for c in self.metrics + self.labels if c.regression]

    @property
    def failed_gates(self) -> list[dict]:
        return [g for g in self.gates if not gate_passes(g)]

    def exit_code(self, fail_on_regression: bool) -> int:
        if self.failed_gates or (fail_on_regression and self.regressions):
            return EXIT_STAGE_FAILED
        return EXIT_OK

    def to_json(self) -> dict:
        return {"a": self.a, "b": self.b,
                "metrics": [asdict(c) for c in self.metrics],
                "labels": [asdict(c) for c in self.labels],
                "gates": [{**g, "passed": gate_passes(g)} for g in self.gates],
                "regressions": [c.name for c in self.regressions],
                "failed_gates": [g["gate"] for g in self.failed_gates]}


def find_report(path: str | Path) -> Path:
    """report.json of a build directory, a bundle directory, or the file itself."""
    path = Path(path)
    for candidate in (path / "bundle" / "report.json", path / "report.json", path):
        if candidate.is_file():
            return candidate
    raise UsageError(f"no report.json in {path} or {path / 'bundle'}: give a build directory "
                     "(build/<name>/), its bundle/ or a report.json")


def load_report(path: str | Path) -> tuple[str, dict]:
    """(where it was read from, the report)."""
    report_path = find_report(path)
    try:
        report = json.loads(report_path.read_text(encoding="utf-8"))
    except ValueError as exc:
        raise UsageError(f"{report_path} is not valid JSON: {exc}") from None
    if not isinstance(report, dict) or "metrics" not in report:
        raise UsageError(f"{report_path} is not a bundle report (no 'metrics'); "
                         "rebuild the bundle with distill compile")
    return str(report_path), report


def lookup(report: dict, path: tuple[str, ...]) -> float | None:
    value = report
    for key in path:
        if not isinstance(value, dict):
            return None
        value = value.get(key)
    return value if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def change(name: str, a: float | None, b: float | None, higher_is_better: bool,
           tolerance: float, relative: bool = False) -> Change:
    if a is None or b is None:
        return Change(name, a, b, None, None, False)
    delta = b - a
    worse = -delta if higher_is_better else delta
    worse = worse if worse > 0 else 0.0
    if relative:
        worse = worse / abs(a) if a else (0.0 if worse == 0 else float("inf"))
    return Change(name, a, b, delta, worse, worse > tolerance + 1e-12)


def compare(a: tuple[str, dict], b: tuple[str, dict], tolerance: float = DEFAULT_TOLERANCE,
            latency_tolerance: float = DEFAULT_LATENCY_TOLERANCE) -> Diff:
    (where_a, report_a), (where_b, report_b) = a, b
    metrics = [change(m.name, lookup(report_a, m.path), lookup(report_b, m.path),
                      m.higher_is_better, latency_tolerance if m.latency else tolerance,
                      m.relative)
               for m in METRICS]
    f1_a, f1_b = per_label_f1(report_a), per_label_f1(report_b)
    # A's labels in order, then labels only B has: a new intent shows up as A = n/a.
    labels = list(f1_a) + [label for label in f1_b if label not in f1_a]
    label_changes = [change(label, f1_a.get(label), f1_b.get(label), True, tolerance)
                     for label in labels]
    return Diff(where_a, where_b, metrics, label_changes, list(report_b.get("gates") or []))


def per_label_f1(report: dict) -> dict[str, float | None]:
    table = report["metrics"].get("test", {}).get("per_label", {})
    return {label: row.get("f1") for label, row in table.items()}


def gate_passes(gate: dict) -> bool:
    """Re-check a recorded gate from its value and limit rather than trusting `passed`."""
    value, limit = gate.get("value"), gate["limit"]
    if value is None:
        return False
    # Bundles built before gates recorded their direction: the name says it (min_*, max_*).
    higher = gate.get("higher_is_better", gate["gate"].startswith("min_"))
    return value >= limit if higher else value <= limit


def render(diff: Diff, console, fail_on_regression: bool) -> None:
    """The diff as rich tables on `console`, then a one-line verdict."""
    from rich.markup import escape
    from rich.table import Table

    console.print(f"A: {escape(diff.a)}\nB: {escape(diff.b)}")
    for title, changes in (("metric", diff.metrics), ("label F1 (test)", diff.labels)):
        table = Table(box=None, pad_edge=False)
        table.add_column(title)
        for column in ("A", "B", "change"):
            table.add_column(column, justify="right")
        table.add_column("")
        for c in changes:
            flag = "[red]worse[/]" if c.regression else ""
            table.add_row(escape(c.name), fmt(c.name, c.a), fmt(c.name, c.b),
                          fmt(c.name, c.delta, signed=True), flag)
        console.print(table)
    for g in diff.gates:
        verdict = "[green]pass[/]" if gate_passes(g) else "[red]FAIL[/]"
        console.print(f"gate {escape(g['gate'])}: {verdict} ({escape(g['metric'])} "
                      f"{fmt(g['metric'], g.get('value'))}, limit {fmt(g['metric'], g['limit'])})")
    regressions = ", ".join(c.name for c in diff.regressions)
    if diff.failed_gates:
        console.print("[red]B fails its gates[/]")
    elif diff.regressions:
        severity = "[red]" if fail_on_regression else "[yellow]"
        console.print(f"{severity}regressions:[/] {escape(regressions)}")
    else:
        console.print("[green]no regressions[/]")


def fmt(name: str, value: float | None, signed: bool = False) -> str:
    """A metric value (or, with `signed`, a delta) in the unit its name implies."""
    if value is None:
        return "" if signed else "n/a"
    sign = "+" if signed else ""
    if name.endswith("_ms"):
        return f"{value:{sign}.2f} ms"
    if name == "model_bytes":
        return f"{value / 1e6:{sign}.2f} MB"
    return f"{value:{sign}.3f}"
