"""The README's set-up commands and CI stay in step."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def readme_commands() -> list[str]:
    block = re.search(r"```bash\n(.*?)```", (ROOT / "README.md").read_text(), re.S).group(1)
    return [line for line in block.splitlines() if line and not line.startswith("#")]


def test_ci_runs_the_readmes_second_command():
    install_and_main, install_and_test = readme_commands()[:2]
    assert "pytest" in install_and_test and "train_rnn.py" in install_and_main
    ci_lines = [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()]
    assert install_and_test in ci_lines


def test_requirements_pin_torch():
    assert "torch==2.13.0" in (ROOT / "requirements.txt").read_text().split()
