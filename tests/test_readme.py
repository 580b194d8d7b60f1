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


def test_public_api_names():
    for name in ("SteeringPlan", "attach", "PlanError", "SITES", "ModelSpec"):
        assert hasattr(fs, name)
    assert callable(fs.models.load)
