"""The README's Python examples run as written, and its quick start matches CI."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()
# A block preceded by this comment is shown but not run (e.g. it needs several hosts).
SKIP = "<!-- not-run -->"


def _python_blocks():
    for match in re.finditer(r"(?P<before>[^\n]*)\n```python\n(?P<code>.*?)```", README, re.S):
        line = README.count("\n", 0, match.start("code"))
        if SKIP not in match.group("before"):
            yield pytest.param(match.group("code"), id=f"line{line}")


@pytest.mark.parametrize("code", list(_python_blocks()))
def test_readme_example_runs(code, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    exec(compile(code, "README.md", "exec"), {"__name__": "__readme__"})


def test_ci_runs_the_readme_test_command():
    quick_start = re.search(r"<!-- quickstart:begin -->\n```bash\n(.*?)```", README, re.S).group(1)
    demo_command, test_command = quick_start.strip().splitlines()
    assert "python -m jbn demo" in demo_command
    ci = (ROOT / ".ci" / "run").read_text()
    assert test_command in ci
