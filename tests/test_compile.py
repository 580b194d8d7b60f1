"""Steering under torch.compile(fullgraph=True) with a static KV cache: no graph breaks, as many graphs as the
unsteered model, and no recompiles when values, routing or the token phase change (dynamo's "eager" backend:
the same tracing, without inductor's code generation time)."""

import pytest
import torch
from conftest import random_plan
from torch._dynamo.utils import counters

import fusesteer as fs
from fusesteer.runtime.compat import with_cache

SITES = ["layer.out", "mlp.down_proj.in", "attn.o_proj.in", "mlp.out"]
B, T, STEPS = 2, 6, 6


def _counts():
    return {"graphs": int(counters["stats"]["unique_graphs"]),
            "breaks": int(sum(counters["graph_break"].values())),
            "recompiles": int(sum(counters["recompiles"].values())) if "recompiles" in counters else 0}


def _decode(model, on_step=None):
    """Compiled prefill + STEPS decode steps on a static cache; returns (tokens, dynamo counts)."""
    from transformers import StaticCache

    torch._dynamo.reset()
    counters.clear()
    f = torch.compile(model.forward, backend="eager", fullgraph=True, dynamic=False)
    ids = torch.randint(1, model.config.vocab_size, (B, T), generator=torch.Generator().manual_seed(0))
    cache = StaticCache(config=model.config, max_cache_len=T + STEPS + 2)
    toks = []
    with torch.no_grad():
        o = f(input_ids=ids, position_ids=torch.arange(T).expand(B, T), use_cache=True, **with_cache(model, cache))
        nxt = o.logits[:, -1:].argmax(-1)
        for s in range(STEPS):
            if on_step is not None:
                on_step(s)
            toks.append(nxt)
            o = f(input_ids=nxt, position_ids=torch.full((B, 1), T + s), use_cache=True, **with_cache(model, cache))
            nxt = o.logits[:, -1:].argmax(-1)
    return torch.cat(toks, 1), _counts()


def _eager(model, plans, backend, on_step):
    """The same decode, uncompiled, with the reference backend."""
    from transformers import StaticCache

    with fs.attach(model, plans, backend=backend) as h:
        h.route(["a", None])
        ids = torch.randint(1, model.config.vocab_size, (B, T), generator=torch.Generator().manual_seed(0))
        cache = StaticCache(config=model.config, max_cache_len=T + STEPS + 2)
        toks = []
        with torch.no_grad():
            o = model(input_ids=ids, position_ids=torch.arange(T).expand(B, T), use_cache=True,
                      **with_cache(model, cache))
            nxt = o.logits[:, -1:].argmax(-1)
            for s in range(STEPS):
                on_step(h, s)
                toks.append(nxt)
                o = model(input_ids=nxt, position_ids=torch.full((B, 1), T + s), use_cache=True,
                          **with_cache(model, cache))
                nxt = o.logits[:, -1:].argmax(-1)
    return torch.cat(toks, 1)


@pytest.mark.parametrize("family,backend", [("llama", "torch"), ("llama", "triton"), ("llama", "reference"),
                                            ("gemma3", "torch")])  # gemma3 traces ~5x slower: one backend
def test_fullgraph_compile_no_breaks_no_recompiles(tiny_models, family, backend):
    model = tiny_models(family)
    _, vanilla = _decode(model)
    assert vanilla["breaks"] == 0
    plan = random_plan(model, SITES, seed=1, gating="generated", scale=1.0)
    plan.extend(random_plan(model, ["mlp.out"], seed=5, gating="prompt", scale=1.0))
    plan2 = random_plan(model, SITES, seed=2, gating="generated", scale=1.0)
    plans = {"a": plan, "b": plan2}

    def change(h, s):  # values, then routing, while decoding moves from prompt to generated tokens
        if s == 2:
            h.update("a", random_plan(model, SITES, seed=3, gating="generated", scale=1.0))
        if s == 4:
            h.route([None, "b"])

    with fs.attach(model, plans, backend=backend) as h:
        h.route(["a", None])
        toks, steered = _decode(model, lambda s: change(h, s))
    assert steered == {"graphs": vanilla["graphs"], "breaks": 0, "recompiles": 0}
    assert torch.equal(toks, _eager(model, plans, "reference", change))
