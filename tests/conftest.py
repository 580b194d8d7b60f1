import os

import pytest
import torch

# The tests run every Triton kernel through Triton's interpreter (on CPU tensors), unless TRITON_INTERPRET is
# set already. It must be on before anything imports Triton or fusesteer.kernels: `@triton.jit` builds an
# interpreted or a compiled kernel when it decorates, and Triton's library functions (tl.sum, ...) and
# fusesteer's kernels are decorated at import.
os.environ.setdefault("TRITON_INTERPRET", "1")

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

from fusesteer.runtime.ir import ModelSpec  # noqa: E402
from fusesteer.testing import TINY_FAMILIES  # noqa: E402

FAMILIES = TINY_FAMILIES  # the one family list every family-parametrized test uses (the tiny model of each)


@pytest.fixture(scope="session")
def tiny_models():
    """Cache of tiny random models per (family, dtype)."""
    from fusesteer.testing import tiny

    cache = {}

    def get(family, dtype=torch.float32):
        key = (family, dtype)
        if key not in cache:
            cache[key] = tiny(family, seed=0, dtype=dtype)
        return cache[key]

    return get


def patched_forward(module):
    """An instance-level ``forward`` on ``module`` that is not just its class's own forward bound to it, or None.
    (transformers 5.0 leaves ``layer.forward = <bound LayerClass.forward>`` on decoder layers after recording
    hidden states; that is the original forward, not a patch.)"""
    fn = module.__dict__.get("forward")
    if fn is None or (getattr(fn, "__self__", None) is module
                      and getattr(fn, "__func__", None) is type(module).forward):
        return None
    return fn


def random_plan(model, sites, sparse=False, seed=0, gating="all", scale=0.5):
    """A plan touching every layer at the given sites with random (a, b): each layer at those of the sites it has
    (a sparse MoE layer has no single ``mlp.down_proj``); every site is on some layer."""
    import fusesteer as fs
    from fusesteer.runtime.families import model_parts

    g = torch.Generator().manual_seed(seed)
    plan = fs.SteeringPlan.for_model(model)
    spec = plan.spec
    parts = model_parts(model)
    assert all(any(s in parts.sites_of(i) for i in range(spec.num_layers)) for s in sites), sites
    for layer in range(spec.num_layers):
        for site in sites:
            if site not in parts.sites_of(layer):
                continue
            w = spec.site_width(site)
            if sparse:
                dims = torch.randperm(w, generator=g)[: max(1, w // 8)]
                n = dims.numel()
            else:
                dims, n = None, w
            a = 1 + scale * (torch.rand(n, generator=g) - 0.5)
            b = scale * torch.randn(n, generator=g)
            plan.add(layer=layer, site=site, a=a, b=b, dims=dims, gating=gating)
    return plan


@pytest.fixture(autouse=True)
def _no_leaked_global_modes():
    """Fail any test that leaves inference mode (thread-local) or grad mode switched on/off behind it,
    e.g. through a suspended generator that yields inside `torch.inference_mode()`."""
    grad = torch.is_grad_enabled()
    assert not torch.is_inference_mode_enabled(), "inference mode was left on by an earlier test"
    yield
    assert not torch.is_inference_mode_enabled(), "this test left torch.inference_mode() enabled"
    assert torch.is_grad_enabled() == grad, "this test changed the global grad mode"


# Hypothesis: CI runs a fixed (derandomized) set of generated cases so a green run is reproducible;
# locally every run explores new cases (`HYPOTHESIS_PROFILE=ci` reproduces CI).
try:
    from hypothesis import settings as _hsettings

    _hsettings.register_profile("ci", derandomize=True, print_blob=True)
    _hsettings.register_profile("dev", print_blob=True)
    _hsettings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci" if os.environ.get("CI") else "dev"))
except ImportError:  # pragma: no cover
    pass


# A small model shape for plan-level tests that need no model.
SMALL_SPEC = ModelSpec("llama", num_layers=4, hidden_size=8, intermediate_size=12, attn_width=8)


def small_plan():
    """One ``layer.out`` entry on :data:`SMALL_SPEC`."""
    import fusesteer as fs

    return fs.SteeringPlan.for_spec(SMALL_SPEC, name="p").add(layer=1, site="layer.out", b=torch.arange(8.0))


def rand_ids(model, batch=2, seq=6, seed=0):
    """Random token ids ``[batch, seq]`` for ``model`` (never 0, the pad id of the tiny models)."""
    return torch.randint(1, model.config.vocab_size, (batch, seq), generator=torch.Generator().manual_seed(seed))
