"""The transformers range mtplab states (pyproject.toml, binder/requirements.txt) is one range, and the installed
transformers (what the tests run on) lies inside it."""
import re
from pathlib import Path

import transformers
from packaging.requirements import Requirement
from packaging.version import Version

ROOT = Path(__file__).resolve().parent.parent


def transformers_requirements(text: str, quoted: bool) -> list:
    lines = [line.split("#", 1)[0].strip() for line in text.splitlines()]
    found = re.findall(r'"(transformers[^"]*)"', "\n".join(lines)) if quoted else \
        [line for line in lines if re.match(r"transformers\b", line)]
    return [Requirement(r) for r in found]


def test_pyproject_and_binder_state_one_transformers_range_that_holds_the_installed_one():
    project = transformers_requirements((ROOT / "pyproject.toml").read_text(), quoted=True)
    binder = transformers_requirements((ROOT / "binder" / "requirements.txt").read_text(), quoted=False)
    assert len(project) == 1 and len(binder) == 1, (project, binder)
    assert project[0].specifier == binder[0].specifier, (str(project[0]), str(binder[0]))
    assert any(s.operator == "<" for s in project[0].specifier), "the range needs an upper bound: the newest tested"
    installed = Version(transformers.__version__)
    assert project[0].specifier.contains(installed, prereleases=True), \
        f"the tests run on transformers {installed}, outside the stated range {project[0].specifier}"
