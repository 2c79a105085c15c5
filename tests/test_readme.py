"""README.md's set-up commands are the ones CI runs, and its code snippets are current."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _commands(text: str) -> list[str]:
    return [
        ln.strip()
        for block in re.findall(r"```(?:bash|sh)\n(.*?)```", text, flags=re.S)
        for ln in block.splitlines()
    ]


def test_ci_runs_the_readme_test_command() -> None:
    readme = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci" / "run").read_text()
    test_cmd = [ln.strip() for ln in ci.splitlines() if "pytest" in ln and not ln.lstrip().startswith("#")]
    assert len(test_cmd) == 1
    assert test_cmd[0] in _commands(readme), "the README's test command and .ci/run differ"


def test_readme_main_job_command_installs_and_trains() -> None:
    cmds = _commands((ROOT / "README.md").read_text())
    main = [c for c in cmds if c.endswith("train.py") and "pip install" in c]
    assert len(main) == 1 and "constraints.txt" in main[0]
