"""The README's test command is what CI runs, and its API example names exist."""

import re
from pathlib import Path

import fusesteer as fs

ROOT = Path(__file__).resolve().parents[1]


def test_readme_test_command_is_what_ci_runs():
    readme = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```bash\n(.*?)\n```", readme, re.S)
    assert len(blocks) >= 2, "README must hold the demo command and the test command"
    demo, tests = blocks[0].strip(), blocks[1].strip()
    assert demo.startswith("python3 -m venv") and demo.endswith("fusesteer demo")
    assert "torch==2.13.0" in demo.split("&&")[2]
    ci = (ROOT / ".ci" / "run").read_text()
    assert tests in ci, "the README's test command must appear verbatim in .ci/run"
    assert ci.index("torch==2.13.0") < ci.index('-e ".[test]"')


def test_ci_skips_only_tests_that_exist():
    """Every test the oldest-transformers pass of .ci/run deselects or ignores exists (a renamed test would
    silently run there again, or a removed file make the pass skip nothing)."""
    ci = (ROOT / ".ci" / "run").read_text()
    variables = dict(re.findall(r"^(\w+)=(tests/\S+)$", ci, re.M))
    deselected = re.findall(r"--deselect (\S+)", ci)
    ignored = re.findall(r"--ignore=(\S+)", ci)
    assert deselected and ignored
    for path in ignored:
        assert (ROOT / path).is_file(), path
    for item in deselected:
        path, name = item.split("::")
        path = variables.get(path.lstrip("$"), path)
        assert re.search(rf"^def {re.escape(name)}\(", (ROOT / path).read_text(), re.M), item


def test_public_api_names():
    for name in ("SteeringPlan", "attach", "PlanError", "SITES", "ModelSpec"):
        assert hasattr(fs, name)
    assert callable(fs.models.load)
