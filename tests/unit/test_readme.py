"""The README's commands are the ones CI runs: keep them from drifting apart."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def readme_commands() -> list[str]:
    blocks = re.findall(r"```bash\n(.*?)```", (ROOT / "README.md").read_text(), re.S)
    return [b.strip() for b in blocks]


def test_ci_runs_exactly_the_readme_test_command():
    ci_command = (ROOT / ".ci" / "run").read_text().strip().splitlines()[-1]
    assert readme_commands()[1] == ci_command


def test_readme_commands_install_pinned_torch_first():
    for command in readme_commands()[:2]:
        steps = command.split("&&")
        torch_step = next(i for i, s in enumerate(steps) if "torch==" in s)
        first_extra = next(i for i, s in enumerate(steps) if "-e '." in s)
        assert torch_step < first_extra, command


def test_main_command_compiles_the_example_and_runs_its_bundle():
    main = readme_commands()[0]
    spec = re.search(r"distill compile (\S+)", main).group(1)
    assert (ROOT / spec).is_file()
    assert "distill run examples/harbor-support/build/harbor-support/bundle" in main
