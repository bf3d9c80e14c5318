"""The `distill` command: a thin click layer over load_spec, plan, build and the runtime.

Heavy imports happen inside the commands that need them: `check`, `show` and `plan` never
import torch. Every user-caused error is printed without a traceback (`--debug` shows one)
and mapped to the exit codes in errors.py.
"""

from __future__ import annotations

import json
import os
import sys
import time
from datetime import timedelta
from pathlib import Path

import click
import yaml
from rich.console import Console
from rich.markup import escape
from rich.progress import ProgressColumn
from rich.table import Table
from rich.text import Text

from . import pipeline
from . import spec as spec_mod
from .errors import EXIT_INTERRUPTED, EXIT_USAGE, DistillError, SpecError, UsageError
from .runtime.format import BundleError

err = Console(stderr=True, highlight=False, soft_wrap=True)
out = Console(highlight=False, soft_wrap=True)


class RateColumn(ProgressColumn):
    """Items per second of a progress task (tokens/s while training, points/s evaluating)."""

    def render(self, task) -> Text:
        return Text("" if task.speed is None else f"{task.speed:,.1f}/s")


class RichReporter(pipeline.Reporter):
    """Stage progress on stderr: a log line per event, a bar per long loop."""

    def __init__(self, console: Console):
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )
        self.console = console
        # The rate and the ETA are what tell a user whether a CPU compile takes minutes or hours.
        self.bars = Progress(TextColumn("  {task.description}"), BarColumn(), MofNCompleteColumn(),
                             RateColumn(),
                             TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(),
                             console=console, transient=True)

    def log(self, message: str) -> None:
        self.console.print(message)

    def progress(self, description: str, total: int | None):
        if not self.console.is_terminal:
            return self.progress_lines(description, total)
        if not self.bars.live.is_started:
            self.bars.start()
        task = self.bars.add_task(description, total=total)
        done = 0

        def advance(n: int = 1) -> None:
            nonlocal done
            if total is not None and done >= total:
                return  # a total that was an estimate (tokens) may be overrun; the bar is gone
            done += n
            self.bars.advance(task, n)
            # Counted here: rich's task list is not indexed by task id once one was removed.
            if total is not None and done >= total:
                self.bars.remove_task(task)
                if not self.bars.tasks:
                    self.bars.stop()
        return advance

    def progress_lines(self, description: str, total: int | None, every_s: float = 60.0):
        """Progress for a log file or a CI console, where no bar is drawn: a line a minute
        (and at the end) with the count, the rate since the previous line and the ETA at it
        (a rate since the start would hide a machine that got busier or quieter)."""
        last = time.monotonic()
        done = done_at_last = 0

        def advance(n: int = 1) -> None:
            nonlocal done, done_at_last, last
            done += n
            now = time.monotonic()
            finished = total is not None and done >= total
            if now - last < every_s and not finished:
                return
            rate = (done - done_at_last) / max(now - last, 1e-9)
            last, done_at_last = now, done
            of = f"/{total:,} ({min(done / total, 1):.0%})" if total else ""
            eta = (f", eta {timedelta(seconds=round((total - done) / rate))}"
                   if total and not finished and rate > 0 else "")
            self.console.print(f"  {description}: {done:,}{of}, {rate:,.1f}/s{eta}")
        return advance

    def close(self) -> None:
        if self.bars.live.is_started:
            self.bars.stop()


def parse_sets(values: tuple[str, ...]) -> dict:
    """`--set student.epochs=5` -> {"student.epochs": 5}; values are read as YAML scalars."""
    parsed = {}
    for item in values:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise UsageError(f"--set expects key=value, got '{item}'")
        try:
            parsed[key.strip()] = yaml.safe_load(raw) if raw else ""
        except yaml.YAMLError as exc:
            problem = str(getattr(exc, "problem", None) or exc).splitlines()[0]
            raise UsageError(f"--set {key}: the value is not a YAML scalar ({problem}); "
                             "quote it, e.g. --set 'name=\"my name\"'") from None
    return parsed


def load_project(spec_path: str, out_dir: str | None, cache: str | None,
                 sets: tuple[str, ...] = ()) -> pipeline.Project:
    spec = spec_mod.load_spec(spec_path, parse_sets(sets))
    return pipeline.Project.of(spec, spec_path, out_dir, cache)


spec_argument = click.argument("spec_path", metavar="SPEC", type=click.Path(dir_okay=False))
out_option = click.option("-o", "--out", "out_dir", type=click.Path(file_okay=False),
                          help="Build directory (default: build/<name>/ beside the spec).")
cache_option = click.option("--cache", type=click.Path(file_okay=False),
                            help="Cache directory (default: .distill/ beside the spec).")
set_option = click.option("--set", "sets", multiple=True, metavar="KEY=VALUE",
                          help="Override a spec field, e.g. --set student.epochs=5.")


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--debug", is_flag=True, help="Show tracebacks for errors.")
@click.version_option(package_name="distill-compiler")
@click.pass_context
def app(ctx: click.Context, debug: bool) -> None:
    """Compile a YAML task spec into a small, fast student model and an edge bundle."""
    ctx.obj = {"debug": debug}
    if debug:
        os.environ["DISTILL_DEBUG"] = "1"  # keeps library warnings and progress bars


@app.command()
@click.argument("specs", metavar="SPEC...", nargs=-1, required=True,
                type=click.Path(dir_okay=False))
def check(specs: tuple[str, ...]) -> None:
    """Validate specs; print every problem as file:line:col."""
    failed = 0
    for path in specs:
        try:
            spec = spec_mod.load_spec(path)
        except SpecError as exc:
            failed += 1
            err.print(escape(exc.render()))
            continue
        out.print(f"{escape(path)}: ok ({spec.task}, {_outline(spec)})")
    if failed:
        sys.exit(EXIT_USAGE)


def _outline(spec: spec_mod.Spec) -> str:
    if spec.task == "classify":
        return f"{len(spec_mod.class_labels(spec.intents, spec.refusals))} labels"
    if spec.task == "extract":
        return f"{len(spec.output.schema_.get('properties', {}))} output fields"
    return f"{len(spec.tools)} tools, {len(spec.scenarios)} scenarios"


@app.command()
@click.argument("spec_path", metavar="[SPEC]", required=False, type=click.Path(dir_okay=False))
@click.option("--docs", is_flag=True, help="Print the documentation of every spec field.")
def show(spec_path: str | None, docs: bool) -> None:
    """Print a spec with every default filled in, or the field reference (--docs)."""
    if docs:
        for name, kind, doc in spec_mod.field_docs():
            out.print(f"[bold]{escape(name)}[/] [dim]{escape(kind)}[/]\n    {escape(doc)}")
        return
    if not spec_path:
        raise UsageError("show needs a SPEC (or --docs)")
    spec = spec_mod.load_spec(spec_path)
    dumped = spec.model_dump(mode="json", by_alias=True)
    out.print(escape(yaml.safe_dump(dumped, sort_keys=False, allow_unicode=True, width=100)),
              end="")


@app.command()
@click.option("-o", "--output", type=click.Path(dir_okay=False),
              help="Write to this file instead of stdout.")
def schema(output: str | None) -> None:
    """Print the JSON Schema of the spec format (specs/task-spec.schema.json)."""
    text = json.dumps(spec_mod.json_schema(), indent=2, ensure_ascii=False) + "\n"
    if output:
        Path(output).write_text(text)
    else:
        click.echo(text, nl=False)


@app.command("plan")
@spec_argument
@out_option
@cache_option
@set_option
def plan_cmd(spec_path: str, out_dir: str | None, cache: str | None, sets: tuple[str, ...]) -> None:
    """Say which stages are cached and which would run, and why."""
    project = load_project(spec_path, out_dir, cache, sets)
    modules = dict(zip(pipeline.STAGE_NAMES, pipeline.STAGES))
    for step in pipeline.plan(project):
        color = "green" if step.status == "cached" else "yellow"
        why = "; ".join(step.reasons)
        out.print(f"{step.name:<9} [{color}]{step.status}[/]" + (f" {escape(why)}" if why else ""))
        if step.status == "stale":
            estimate = pipeline.teacher_estimate(project, modules[step.name])
            if estimate is not None:
                print_estimate(estimate, project.spec.teacher.confirm_over_usd)


def print_estimate(estimate, limit_usd: float | None) -> None:
    """A stage's teacher cost: the total, then each kind of request (teacher/estimate.py)."""
    out.print(f"  teacher: {escape(estimate.describe())}")
    for kind in estimate.kinds:
        out.print(f"    {kind.kind:<12} {kind.requests:>6,} to send {kind.cached:>6,} cached  "
                  f"~{kind.input_tokens:,} in + ~{kind.output_tokens:,} out tokens"
                  + (f" (output: {kind.output_basis})" if kind.requests else ""))
    if limit_usd is not None:
        usd = estimate.usd
        verdict = ("compile asks for --yes" if usd is None or usd > limit_usd
                   else "within it") if estimate.requests else "nothing to pay"
        out.print(f"  teacher.confirm_over_usd ${limit_usd:g}: {verdict}")


@app.command("compile")
@spec_argument
@out_option
@cache_option
@set_option
@click.option("--until", type=click.Choice(pipeline.STAGE_NAMES), help="Stop after this stage.")
@click.option("--force", multiple=True, type=click.Choice(pipeline.STAGE_NAMES),
              help="Rerun this stage even if cached (repeatable).")
@click.option("--yes", is_flag=True,
              help="Pay the teacher even when the estimate exceeds teacher.confirm_over_usd.")
def compile_cmd(spec_path: str, out_dir: str | None, cache: str | None, sets: tuple[str, ...],
                until: str | None, force: tuple[str, ...], yes: bool) -> None:
    """Build the student and its bundle, rerunning only what changed."""
    project = load_project(spec_path, out_dir, cache, sets)
    reporter = RichReporter(err)
    started = time.perf_counter()
    try:
        result = pipeline.build(project, until=until, force=force, reporter=reporter, yes=yes)
    finally:
        reporter.close()
    print_summary(result, time.perf_counter() - started)


def print_summary(result: pipeline.BuildResult, seconds: float) -> None:
    table = Table(title=None, box=None, pad_edge=False)
    for column in ("stage", "status", "seconds", "summary"):
        table.add_column(column)
    for run in result.runs:
        brief = ", ".join(f"{k}={_fmt(v)}" for k, v in list(run.summary.items())[:5])
        table.add_row(run.name, "cached" if run.cached else "ran", f"{run.seconds:.1f}",
                      escape(brief))
    err.print(table)
    ran = sum(not r.cached for r in result.runs)
    gen = result.summary("generate")
    line = (f"{ran} stage(s) ran, {len(result.runs) - ran} cached in {seconds:.1f}s; "
            f"teacher: {gen.get('teacher_requests', 0)} requests, "
            f"{gen.get('cached_requests', 0)} cached, ${gen.get('cost_usd', 0):.4f}")
    err.print(line)
    ev = result.summary("evaluate")
    if ev:
        err.print("metrics: " + ", ".join(f"{k}={_fmt(v)}" for k, v in ev.items()))
    if any(r.name == "bundle" for r in result.runs):
        out.print(f"bundle: {result.project.bundle_dir}")


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


@app.command("run")
@click.argument("bundle", type=click.Path(file_okay=False, exists=True))
@click.argument("request", metavar="INPUT", required=False)
@click.option("--batch", "batch_file", type=click.Path(dir_okay=False, allow_dash=True),
              help="JSONL of inputs, one request per line ('-' for stdin); writes one JSON "
                   "answer per line.")
@click.option("-o", "--output", type=click.Path(dir_okay=False),
              help="With --batch: write the answers here instead of stdout.")
def run_cmd(bundle: str, request: str | None, batch_file: str | None,
            output: str | None) -> None:
    """Answer INPUT (a JSON object) with a bundle, printing route and confidence as JSON."""
    from . import runtime

    loaded = runtime.load_bundle(bundle)
    if batch_file is not None:
        from .serve.batch import score_file

        stats = score_file(loaded, batch_file, output, RichReporter(err))
        err.print(stats.summary())
        if stats.errors:
            sys.exit(1)
        return
    if request is None:
        raise UsageError("give INPUT as a JSON object, e.g. '{\"message\": \"hi\"}', or --batch")
    click.echo(json.dumps(loaded.predict(_json_arg(request, "$")), ensure_ascii=False,
                          indent=2))


def _json_arg(text: str | bytes, where: str):
    """One request as JSON; the bundle's own check refuses what is not an input for it."""
    from .runtime.inputs import parse_json

    return parse_json(text, where)


@app.command("serve")
@click.argument("bundle", type=click.Path(file_okay=False, exists=True))
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Interface to listen on (0.0.0.0 for every one; set --api-key-env then).")
@click.option("--port", default=8000, show_default=True, type=click.IntRange(0, 65535),
              help="Port to listen on (0 picks a free one and prints it).")
@click.option("--threads", type=click.IntRange(1), help="Requests answered in parallel (default: one per core).")
@click.option("--batch-rows", default=4, show_default=True, type=click.IntRange(1),
              help="Agent and extract bundles: requests decoded together in one batch; 1 "
                   "decodes each request on its own, --threads at a time.")
@click.option("--escalation-log", type=click.Path(dir_okay=False),
              help="Append each teacher-answered request here, as a teacher.logs row.")
@click.option("--api-key-env", metavar="VAR",
              help="Require Authorization: Bearer <the value of $VAR> on every request.")
@click.option("--teacher-budget-usd", type=click.FloatRange(0), metavar="USD",
              help="Cap on what teacher calls may spend in this process; then the student answers.")
@click.option("--request-log", type=click.Path(dir_okay=False),
              help="Append one JSON line per completion (route, reason, status, latency, usage).")
@click.option("--log-contents", is_flag=True,
              help="Also keep messages, tools and answers in the request log.")
@click.option("--shadow-rate", type=click.FloatRange(0, 1), metavar="R",
              help="Mirror this share of the requests the student answered to the teacher, in "
                   "the background, and compare the answers.")
@click.option("--shadow-log", type=click.Path(dir_okay=False),
              help="Append each mirrored pair's teacher answer here, as a teacher.logs row.")
@click.option("--drift-window", default=100, show_default=True, type=click.IntRange(1),
              help="Mirrored requests the rolling agreement is computed over.")
@click.option("--drift-margin", default=0.05, show_default=True, type=click.FloatRange(0, 1),
              help="Drift: rolling agreement below the bundle's validation agreement by more.")
@click.option("--drift-action", default="alert", show_default=True,
              type=click.Choice(["alert", "escalate"]),
              help="On drift, only warn (alert) or send all traffic to the teacher until the "
                   "agreement recovers (escalate).")
@click.option("--max-body-bytes", default=1 << 20, show_default=True, type=click.IntRange(1),
              help="Larger request bodies get 413.")
@click.option("--concurrency", default=64, show_default=True, type=click.IntRange(1),
              help="Completions in flight at once; more get 503.")
@click.option("--request-timeout", default=30.0, show_default=True, type=click.FloatRange(0.001),
              help="Seconds before a completion gets 504.")
@click.option("--teacher-timeout", default=10.0, show_default=True, type=click.FloatRange(0.001),
              help="Seconds to wait for the teacher before answering with the student.")
def serve_cmd(bundle: str, host: str, port: int, threads: int | None, batch_rows: int,
              escalation_log: str | None,
              api_key_env: str | None, teacher_budget_usd: float | None,
              request_log: str | None, log_contents: bool, shadow_rate: float | None,
              shadow_log: str | None, drift_window: int, drift_margin: float,
              drift_action: str, max_body_bytes: int, concurrency: int,
              request_timeout: float, teacher_timeout: float) -> None:
    """Serve BUNDLE over an OpenAI-compatible HTTP API (POST /v1/chat/completions)."""
    try:
        from .serve import server
    except ImportError as exc:
        raise UsageError(f"distill serve needs starlette and uvicorn ({exc}); "
                         "pip install 'distill-compiler[serve]'") from None
    if log_contents and not request_log:
        raise UsageError("--log-contents needs --request-log FILE")
    if shadow_log and not shadow_rate:
        raise UsageError("--shadow-log needs --shadow-rate R")
    shadow = None
    if shadow_rate:
        from .serve.shadow import ShadowConfig

        shadow = ShadowConfig(shadow_rate, window=drift_window, margin=drift_margin,
                              action=drift_action)
    limits = server.Limits(max_body_bytes, concurrency, request_timeout, teacher_timeout)
    guard = server.Guard(server.api_key_from(api_key_env, os.environ), request_log, log_contents)
    service = server.build_service(bundle, threads=threads, batch_rows=batch_rows,
                                   escalation_log=escalation_log,
                                   limits=limits, guard=guard, budget_usd=teacher_budget_usd,
                                   shadow=shadow, shadow_log=shadow_log)
    server.serve(service, host, port)


@app.command("diff")
@click.argument("build_a", type=click.Path(exists=True))
@click.argument("build_b", type=click.Path(exists=True))
@click.option("--tolerance", type=float, default=0.01, show_default=True,
              help="How far a rate (agreement, escalation, ECE, label F1) may move the wrong "
                   "way, and model size grow as a fraction, before it counts as a regression.")
@click.option("--latency-tolerance", type=float, default=0.25, show_default=True,
              help="How much latency may grow, as a fraction of A's, before it is a regression.")
@click.option("--fail-on-regression", is_flag=True, help="Exit 1 when any regression is flagged.")
@click.option("--json", "as_json", is_flag=True, help="Print the diff as JSON.")
def diff_cmd(build_a: str, build_b: str, tolerance: float, latency_tolerance: float,
             fail_on_regression: bool, as_json: bool) -> None:
    """Compare two builds' reports; exit 1 when B fails its gates (or regresses, if asked)."""
    from .report import diff

    result = diff.compare(diff.load_report(build_a), diff.load_report(build_b), tolerance,
                          latency_tolerance)
    if as_json:
        click.echo(json.dumps(result.to_json(), indent=2))
    else:
        diff.render(result, out, fail_on_regression)
    sys.exit(result.exit_code(fail_on_regression))


def main(argv: list[str] | None = None) -> None:
    """Entry point: run the app and turn user errors into messages and exit codes."""
    debug = "--debug" in (argv if argv is not None else sys.argv[1:])
    try:
        app.main(args=argv, standalone_mode=False)
    except click.exceptions.Abort:
        err.print("interrupted")
        sys.exit(EXIT_INTERRUPTED)
    except click.ClickException as exc:
        exc.show()
        sys.exit(EXIT_USAGE)
    except KeyboardInterrupt:
        if debug:
            raise
        err.print("interrupted: completed stages and teacher requests are cached; rerun to resume")
        sys.exit(EXIT_INTERRUPTED)
    except DistillError as exc:
        if debug:
            raise
        err.print(escape(exc.render()))
        sys.exit(exc.exit_code)
    except BundleError as exc:  # a bundle that cannot load, or a request it refuses
        if debug:
            raise
        err.print(escape(f"error: {exc}"))
        sys.exit(EXIT_USAGE)


if __name__ == "__main__":  # python -m distill_compiler.cli
    main()
