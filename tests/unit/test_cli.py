"""The `distill` CLI: output, exit codes, and that light commands stay light."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from distill_compiler.cli import main
from distill_compiler.errors import EXIT_USAGE

ROOT = Path(__file__).resolve().parents[2]
GOLDEN = ROOT / "tests" / "golden" / "spec_errors"
EXAMPLE = ROOT / "examples" / "harbor-support" / "spec.yaml"


def run_cli(*args):
    """Run main() in-process; return (exit code, stdout, stderr) via pytest's capture."""
    try:
        main(list(args))
    except SystemExit as exc:
        return exc.code or 0
    return 0


def test_check_ok_and_errors(capsys):
    assert run_cli("check", str(EXAMPLE)) == 0
    assert "ok (classify, 8 labels)" in capsys.readouterr().out
    code = run_cli("check", str(EXAMPLE), str(GOLDEN / "typo_key.yaml"))
    captured = capsys.readouterr()
    assert code == EXIT_USAGE
    assert "typo_key.yaml:8:3: error: teacher.temprature: unknown field" in captured.err
    assert "Traceback" not in captured.err


@pytest.mark.parametrize("case", ["control_character", "unknown_tag", "yaml11_booleans",
                                  "not_utf8", "alias_loop", "too_deep"])
def test_check_reports_unreadable_yaml_as_spec_errors(case, capsys):
    code = run_cli("check", str(GOLDEN / f"{case}.yaml"))
    captured = capsys.readouterr()
    assert code == EXIT_USAGE
    assert f"{case}.yaml:" in captured.err and ": error: " in captured.err
    assert "Traceback" not in captured.err


def test_set_with_unreadable_yaml_is_a_usage_error(capsys):
    code = run_cli("plan", str(EXAMPLE), "--set", "student.epochs=!!python/object:os.system x")
    captured = capsys.readouterr()
    assert code == EXIT_USAGE
    assert "--set student.epochs" in captured.err and "Traceback" not in captured.err


def test_show_fills_defaults_and_docs(capsys):
    assert run_cli("show", str(EXAMPLE)) == 0
    shown = capsys.readouterr().out
    assert "warmup_ratio: 0.1" in shown and "name: harbor-support" in shown
    assert run_cli("show", "--docs") == 0
    docs = capsys.readouterr().out
    assert "teacher.budget_usd" in docs and "Hard spending cap" in docs


def test_plan_on_a_fresh_project(tmp_path, capsys):
    assert run_cli("plan", str(EXAMPLE), "--cache", str(tmp_path / "c"), "-o", str(tmp_path / "b")) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["generate", "stale", "never", "built"]
    assert [l.split()[0] for l in lines] == ["generate", "curate", "train", "export", "evaluate", "bundle"]


def test_usage_errors_exit_2_without_traceback(tmp_path, capsys):
    assert run_cli("check", str(tmp_path / "missing.yaml")) == EXIT_USAGE
    assert "cannot read spec" in capsys.readouterr().err
    assert run_cli("plan", str(EXAMPLE), "--set", "student.epochs") == EXIT_USAGE
    assert "--set expects key=value" in capsys.readouterr().err
    assert run_cli("plan", str(EXAMPLE), "--set", "student.epoch=4") == EXIT_USAGE
    assert "did you mean 'epochs'" in capsys.readouterr().err
    assert run_cli("nonsense") == EXIT_USAGE


def test_debug_lets_the_exception_through(tmp_path):
    from distill_compiler.errors import SpecError

    with pytest.raises(SpecError):
        main(["--debug", "plan", str(tmp_path / "missing.yaml")])


def test_schema_command_writes_the_checked_in_schema(tmp_path):
    assert run_cli("schema", "-o", str(tmp_path / "s.json")) == 0
    assert json.loads((tmp_path / "s.json").read_text()) == json.loads(
        (ROOT / "specs" / "task-spec.schema.json").read_text())


@pytest.mark.parametrize("command", [["check"], ["show"], ["plan"]])
def test_light_commands_never_import_torch(command, tmp_path):
    extra = ["--cache", str(tmp_path / "c"), "-o", str(tmp_path / "b")] if command == ["plan"] else []
    code = (
        "import sys\n"
        "from distill_compiler.cli import main\n"
        f"try:\n    main({command + [str(EXAMPLE)] + extra!r})\n"
        "except SystemExit as e:\n    assert not e.code, e.code\n"
        "heavy = [m for m in ('torch', 'transformers', 'litellm', 'onnxruntime') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True)


def test_a_progress_bar_survives_more_work_than_its_estimate():
    """Training bars count tokens against an estimate; overrunning it must not fail the stage."""
    import io

    from rich.console import Console

    from distill_compiler.cli import RichReporter

    reporter = RichReporter(Console(file=io.StringIO(), force_terminal=True))
    advance = reporter.progress("fine-tuning (tokens)", 10)
    for n in (8, 8, 3):
        advance(n)
    other = reporter.progress("evaluate", 2)
    other(2)
    assert not reporter.bars.tasks
    reporter.close()


def test_progress_in_a_log_file_is_lines_with_rate_and_eta(monkeypatch):
    """No bar is drawn where stderr is not a terminal (CI, `> log 2>&1`): a line a minute."""
    import io

    from rich.console import Console

    from distill_compiler import cli

    clock = iter([0.0, 30.0, 61.0, 62.0, 200.0])
    monkeypatch.setattr(cli.time, "monotonic", lambda: next(clock))
    buffer = io.StringIO()
    advance = cli.RichReporter(Console(file=buffer, width=200)).progress("fine-tuning (tokens)",
                                                                         1000)
    advance(100)   # 30 s: too soon for a line
    advance(100)   # 61 s: 200 done
    advance(100)   # 62 s: too soon
    advance(700)   # done: always a line
    lines = buffer.getvalue().splitlines()
    # rates since the previous line: 200 in 61 s, then 800 in 139 s
    assert lines == ["  fine-tuning (tokens): 200/1,000 (20%), 3.3/s, eta 0:04:04",
                     "  fine-tuning (tokens): 1,000/1,000 (100%), 5.8/s"]
