"""Golden tests: the exact error output for invalid specs.

Each tests/golden/spec_errors/<case>.yaml has its expected `distill check` output beside it in
<case>.txt. Set UPDATE_GOLDEN=1 to rewrite the .txt files after an intended change, then
review the diff.
"""

import os
from pathlib import Path

import pytest

from distill_compiler.errors import SpecError
from distill_compiler.spec.load import load_spec

GOLDEN = Path(__file__).resolve().parent.parent / "golden" / "spec_errors"
CASES = sorted(p.stem for p in GOLDEN.glob("*.yaml"))


def rendered_errors(case: str) -> str:
    # Run from GOLDEN (the caller chdirs) so the golden text does not depend on the checkout path.
    with pytest.raises(SpecError) as caught:
        load_spec(f"{case}.yaml")
    return caught.value.render() + "\n"


def test_there_are_at_least_fifteen_cases():
    assert len(CASES) >= 15


@pytest.mark.parametrize("case", CASES)
def test_error_output_matches_golden(case, monkeypatch):
    monkeypatch.chdir(GOLDEN)
    actual = rendered_errors(case)
    expected_file = GOLDEN / f"{case}.txt"
    if os.environ.get("UPDATE_GOLDEN"):
        expected_file.write_text(actual)
    assert actual == expected_file.read_text()


@pytest.mark.parametrize("case", CASES)
def test_every_problem_points_at_a_line(case, monkeypatch):
    monkeypatch.chdir(GOLDEN)
    with pytest.raises(SpecError) as caught:
        load_spec(f"{case}.yaml")
    for problem in caught.value.problems:
        assert problem.line and problem.col and problem.snippet, problem
