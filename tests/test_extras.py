"""The core install (torch, transformers, safetensors, numpy, tqdm) attaches plans without any extra; a
feature that needs one says which extra to install."""

import subprocess
import sys
import textwrap

SCRIPT = textwrap.dedent('''
    import importlib.abc, importlib.util, sys
    BLOCK = {"optuna", "matplotlib", "gguf", "accelerate", "triton", "bitsandbytes", "sqlalchemy", "fastapi",
             "uvicorn"}
    class Blocker(importlib.abc.MetaPathFinder):  # as if those packages were not installed
        def find_spec(self, name, path, target=None):
            if name.split(".")[0] in BLOCK:
                raise ModuleNotFoundError(f"No module named {name!r}")
    sys.meta_path.insert(0, Blocker())
    _find = importlib.util.find_spec
    importlib.util.find_spec = lambda n, *a: None if n.split(".")[0] in BLOCK else _find(n, *a)
    import torch, fusesteer as fs
    from fusesteer.testing import tiny
    m = tiny("llama")
    p = fs.SteeringPlan.for_model(m).add(layer=1, site="layer.out", b=torch.ones(m.config.hidden_size))
    for backend in ("auto", "torch", "reference", "fold"):
        with fs.attach(m, p, backend=backend):
            m(torch.tensor([[1, 2, 3]]))
    from fusesteer.interop.gguf_cv import read_control_vectors
    try:
        read_control_vectors([("x.gguf", 1.0)], fs.ModelSpec.from_model(m))
    except fs.FuseSteerError as e:
        assert "fusesteer[gguf]" in str(e), e
    else:
        raise AssertionError("no error without gguf")
    from fusesteer.methods.fusion.study import _optuna
    try:
        _optuna()
    except fs.FuseSteerError as e:
        assert "fusesteer[methods]" in str(e), e
    import fusesteer.cli  # noqa: F401
    loaded = sorted(k for k in sys.modules if k.split(".")[0] in BLOCK)
    assert not loaded, loaded
    print("core ok")
''')


def test_core_without_extras():
    r = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and "core ok" in r.stdout, r.stderr[-3000:]
