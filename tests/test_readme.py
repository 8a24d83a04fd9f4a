"""README.md opens with the install+run and test commands, and .ci/run runs exactly those."""
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def readme_commands():
    text = (ROOT / "README.md").read_text()
    block = text.split("```bash\n", 1)[1].split("```", 1)[0]
    return [line for line in block.splitlines() if line.strip()]


def test_readme_opens_with_two_commands():
    cmds = readme_commands()
    assert len(cmds) == 2
    assert "pip install" in cmds[0] and "nbformer " in cmds[0]
    assert "pytest" in cmds[1]


def test_ci_runs_exactly_the_readme_commands():
    ci = [line for line in (ROOT / ".ci" / "run").read_text().splitlines()
          if line.strip() and not line.startswith("#") and not line.startswith(("set ", "cd "))]
    assert ci == readme_commands()
