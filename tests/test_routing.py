"""Device-side routing and gating against a plain-hook oracle that knows each token's phase by construction.

The oracle is independent of fusesteer's router: forward hooks that count the decoder stack's calls inside one
generate() (call 0 is the prompt; later calls are one generated token each with the cache, or the whole
sequence again without it, where tokens past the prompt are generated) and apply x' = a*x + b per row.
"""

import warnings

import pytest
import torch
from conftest import FAMILIES, random_plan

import fusesteer as fs
from fusesteer.runtime.compat import CACHE_KEYWORDS, cache_keyword, output_cache

SITES3 = ["layer.out", "attn.o_proj.in", "mlp.out"]
STEPS = 6


class Oracle:
    def __init__(self, model, row_plans, prompt_len: int, use_cache: bool):
        spec = fs.ModelSpec.from_model(model)
        self.maps = [None if p is None else p.phase_maps(spec) for p in row_plans]
        self.prompt_len, self.use_cache, self.calls = prompt_len, use_cache, -1
        self.handles = [model.model.register_forward_pre_hook(self._count)]
        for i, layer in enumerate(model.model.layers):
            self.handles.append(layer.register_forward_hook(
                lambda m, a, out, i=i: self._apply(out, i, "layer.out")))
            self.handles.append(layer.mlp.register_forward_hook(lambda m, a, out, i=i: self._apply(out, i, "mlp.out")))
            self.handles.append(layer.self_attn.o_proj.register_forward_pre_hook(
                lambda m, a, i=i: (self._apply(a[0], i, "attn.o_proj.in"),)))

    def _count(self, *_):
        self.calls += 1

    def _generated(self, T):
        if self.calls == 0:
            return torch.zeros(T, dtype=torch.bool)
        if self.use_cache:
            return torch.ones(T, dtype=torch.bool)
        return torch.arange(T) >= self.prompt_len

    def _apply(self, x, layer, site):
        out = x[0] if isinstance(x, tuple) else x
        y = out.clone()
        gen = self._generated(out.shape[1])
        for r, m in enumerate(self.maps):
            if m is None or (layer, site) not in m:
                continue
            for phase, sel in (("prompt", ~gen), ("generated", gen)):
                a, b = m[(layer, site)][phase]
                y[r, sel] = torch.addcmul(b, out[r, sel].float(), a).to(out.dtype)
        return (y,) + tuple(x[1:]) if isinstance(x, tuple) else y

    def remove(self):
        for h in self.handles:
            h.remove()


def _batch(model, lengths, seed=5):
    g = torch.Generator().manual_seed(seed)
    T = max(lengths)
    ids = torch.zeros(len(lengths), T, dtype=torch.long)
    mask = torch.zeros(len(lengths), T, dtype=torch.long)
    for i, n in enumerate(lengths):  # left padding
        ids[i, T - n:] = torch.randint(1, model.config.vocab_size, (n,), generator=g)
        mask[i, T - n:] = 1
    return ids, mask


def _generate(model, ids, mask, use_cache):
    with torch.no_grad():
        out = model.generate(ids, attention_mask=mask, max_new_tokens=STEPS, min_new_tokens=STEPS, do_sample=False,
                             output_logits=True, return_dict_in_generate=True, pad_token_id=0, use_cache=use_cache)
    return out.sequences[:, ids.shape[1]:], torch.stack(out.logits, 1)


def _plans(model):
    calm = random_plan(model, ["layer.out"], seed=11, gating="prompt", scale=1.0)
    calm.extend(random_plan(model, ["attn.o_proj.in"], seed=14, gating="generated", scale=1.0))
    bold = random_plan(model, ["mlp.out", "attn.o_proj.in"], sparse=True, seed=12, gating="generated", scale=1.0)
    bold.extend(random_plan(model, ["layer.out"], seed=13, gating="all", scale=0.3))
    return calm, bold


def _check_against_oracle(model, backend, use_cache, lengths=(5, 8, 3), rows=("calm", None, "bold"), tol=1e-5):
    calm, bold = _plans(model)
    plans = {"calm": calm, "bold": bold}
    ids, mask = _batch(model, list(lengths))
    with fs.attach(model, plans, backend=backend) as h:
        h.route(list(rows))
        toks, logits = _generate(model, ids, mask, use_cache)
    oracle = Oracle(model, [plans.get(r) for r in rows], ids.shape[1], use_cache)
    try:
        want_toks, want_logits = _generate(model, ids, mask, use_cache)
    finally:
        oracle.remove()
    assert torch.equal(toks, want_toks)
    assert (logits - want_logits).abs().max() <= tol


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("backend", ["torch", "reference"])
@pytest.mark.parametrize("use_cache", [True, False], ids=["cache", "no-cache"])
def test_gating_per_row_left_padding_matches_oracle(tiny_models, family, backend, use_cache):
    _check_against_oracle(tiny_models(family), backend, use_cache)


@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_triton_gating_matches_oracle(tiny_models, family):
    _check_against_oracle(tiny_models(family), "triton", True, lengths=(4, 6), rows=("calm", "bold"), tol=1e-4)


@pytest.mark.parametrize("family", ["llama", "gemma2"])
def test_use_cache_false_gives_the_same_tokens(tiny_models, family):
    model = tiny_models(family)
    calm, bold = _plans(model)
    ids, mask = _batch(model, [5, 8, 3])
    with fs.attach(model, {"calm": calm, "bold": bold}, backend="torch") as h:
        h.route(["bold", "calm", None])
        with_cache, l1 = _generate(model, ids, mask, True)
        without, l2 = _generate(model, ids, mask, False)
    assert torch.equal(with_cache, without)
    assert (l1 - l2).abs().max() <= 1e-4


def _keywords(model):
    """The cache keywords this model's forward accepts (5.24+: `cache`, and `past_key_values` deprecated)."""
    import inspect

    params = inspect.signature(type(model).forward).parameters
    new = cache_keyword(model)
    return [new] + (["past_key_values"] if new == "cache" and "past_key_values" not in params else [])


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_hand_written_loop_with_either_cache_keyword_equals_generate(tiny_models, family):
    model = tiny_models(family)
    plan = random_plan(model, SITES3, seed=3, gating="generated", scale=1.0)
    plan.extend(random_plan(model, ["mlp.down_proj.in"], seed=4, gating="prompt", scale=1.0))
    ids, _ = _batch(model, [6, 6])
    with fs.attach(model, plan, backend="torch"):
        want, _ = _generate(model, ids, None, True)
        for kw in _keywords(model):
            assert kw in CACHE_KEYWORDS
            with warnings.catch_warnings(), torch.no_grad():
                warnings.simplefilter("ignore", FutureWarning)  # the deprecated keyword, on purpose
                out = model(ids, use_cache=True)
                cache, toks = output_cache(out), []
                nxt = out.logits[:, -1].argmax(-1, keepdim=True)
                for _ in range(STEPS):
                    toks.append(nxt)
                    out = model(nxt, use_cache=True, **{kw: cache})
                    cache = output_cache(out)
                    nxt = out.logits[:, -1].argmax(-1, keepdim=True)
            assert torch.equal(torch.cat(toks, 1), want), kw


def test_set_prompt_length_per_row_and_validation(tiny_models):
    model = tiny_models("llama")
    plan = random_plan(model, ["layer.out"], seed=2, gating="generated", scale=2.0)
    ids, _ = _batch(model, [6, 6])
    with torch.no_grad():
        vanilla = model(ids).logits
    with fs.attach(model, plan, backend="torch") as h:
        h.set_prompt_length([6, 3])  # row 0: all 6 tokens are prompt; row 1: tokens 3.. are generated
        with torch.no_grad():
            got = model(ids).logits
        for bad in (-3, 2.5, True, [], [1, "x"]):
            with pytest.raises(fs.AttachError, match="set_prompt_length"):
                h.set_prompt_length(bad)
    assert torch.equal(got[0], vanilla[0])
    assert torch.equal(got[1, :3], vanilla[1, :3])
    assert (got[1, 3:] - vanilla[1, 3:]).abs().max() > 1e-3


def test_route_tokens_equals_route(tiny_models):
    model = tiny_models("qwen2")
    calm, bold = _plans(model)
    ids, mask = _batch(model, [7, 7, 7])
    with fs.attach(model, {"calm": calm, "bold": bold}, backend="torch") as h:
        h.route(["calm", None, "bold"]).set_prompt_length(4)
        with torch.no_grad():
            want = model(ids).logits
        pids = torch.tensor([[h.plan_id("calm")], [0], [h.plan_id("bold")]])
        h.route_tokens(pids, torch.full((3, 1), 4))
        with torch.no_grad():
            got = model(ids).logits
        with pytest.raises(fs.AttachError, match="not attached"):
            h.route_tokens(torch.tensor([[7]]), torch.tensor([[0]]))
    assert torch.equal(got, want)


@pytest.mark.parametrize("backend", ["torch", "reference"])
def test_add_and_remove_plans_without_repatching(tiny_models, backend):
    model = tiny_models("gemma3")
    calm, bold = _plans(model)
    ids, mask = _batch(model, [5, 3])
    with torch.no_grad():
        vanilla = model(ids, attention_mask=mask).logits
    with fs.attach(model, {"calm": calm}, backend=backend) as h:
        h.route(["calm", None])
        with torch.no_grad():
            want_calm = model(ids, attention_mask=mask).logits
    with fs.attach(model, {"bold": bold}, backend=backend) as h:
        h.route([None, "bold"])
        with torch.no_grad():
            want_bold = model(ids, attention_mask=mask).logits
    with fs.attach(model, {}, backend=backend, capacity=2, sites="all") as h:
        patched = len(h.patcher._undo)
        h.route([None, None])
        with torch.no_grad():
            assert torch.equal(model(ids, attention_mask=mask).logits, vanilla)
        h.add_plan("calm", calm)
        h.route(["calm", None])
        with torch.no_grad():
            assert torch.equal(model(ids, attention_mask=mask).logits, want_calm)
        h.add_plan("bold", bold)
        with pytest.raises(fs.AttachError, match="plan slots are in use"):
            h.add_plan("third", calm)
        h.route([None, "bold"])
        with pytest.raises(fs.AttachError, match="routed"):
            h.remove_plan("bold")
        with torch.no_grad():
            assert torch.equal(model(ids, attention_mask=mask).logits, want_bold)
        h.route([None, None])
        h.remove_plan("bold")
        h.add_plan("again", bold)
        h.route([None, "again"])
        with torch.no_grad():
            assert torch.equal(model(ids, attention_mask=mask).logits, want_bold)
        assert len(h.patcher._undo) == patched  # nothing was re-patched
    with fs.attach(model, {}, backend=backend, capacity=1, sites=[(0, "layer.out")]) as h:
        with pytest.raises(fs.PlanError, match="does not patch"):
            h.add_plan("calm", calm)


# ---- rows past the routing tensors' first size, lengths that do not match the batch, route_tokens ---------
@pytest.mark.parametrize("backend", ["reference", "torch"])
@pytest.mark.parametrize("how", ["int", "list", "learned"])
def test_gating_past_the_initial_row_count(tiny_models, backend, how):
    """70 copies of one prompt (more rows than the per-row tensors start with): every row is gated alike."""
    model = tiny_models("llama")
    plan = random_plan(model, ["layer.out"], seed=3, gating="generated", scale=1.0)
    ids = torch.randint(1, model.config.vocab_size, (1, 6), generator=torch.Generator().manual_seed(0))
    batch = ids.expand(70, 6).contiguous()
    with fs.attach(model, plan, backend=backend) as h:
        if how != "learned":
            h.set_prompt_length(3)
        with torch.no_grad():
            one = model(ids).logits
            if how == "list":
                h.set_prompt_length([3] * 70)
            got = model(batch).logits
    assert (got - got[:1]).abs().amax(dim=(1, 2)).max().item() == 0.0  # rows 64..69 gated like row 0
    assert (got[0] - one[0]).abs().max().item() < 1e-4  # and row 0 like the prompt alone (batching rounds)


def test_prompt_lengths_must_match_the_batch(tiny_models):
    model = tiny_models("llama")
    plan = random_plan(model, ["layer.out"], seed=3, gating="generated")
    ids = torch.randint(1, model.config.vocab_size, (3, 5))
    with fs.attach(model, plan, backend="torch") as h:
        h.set_prompt_length([3, 3])
        with pytest.raises(fs.AttachError, match="2 lengths but the batch has 3 rows"):
            model(ids)
        h.set_prompt_length([3, 3, 3])
        with torch.no_grad():
            model(ids)
        for bad in (2 ** 63, 10 ** 30, [2 ** 63], -1):
            with pytest.raises(fs.AttachError, match=r"set_prompt_length.*\[0, 2\*\*62\)"):
                h.set_prompt_length(bad)


@pytest.mark.parametrize("backend", ["reference", "torch"])
def test_route_tokens_keeps_its_plans_attached(tiny_models, backend):
    """A plan referenced by route_tokens() cannot be removed (its id would be reused by the next add_plan)."""
    model = tiny_models("qwen2")
    calm, bold = _plans(model)
    ids, _ = _batch(model, [6, 6])
    with fs.attach(model, {}, backend=backend, capacity=2, sites="all") as h:
        h.add_plan("calm", calm)
        h.route_tokens(torch.tensor([[1], [0]]), torch.tensor([[4], [4]]))
        with torch.no_grad():
            want = model(ids).logits
        with pytest.raises(fs.AttachError, match="routed to by route_tokens"):
            h.remove_plan("calm")
        h.add_plan("bold", bold)  # takes the other id
        with torch.no_grad():
            assert torch.equal(model(ids).logits, want)
        h.route([None, None])
        h.remove_plan("calm")


def test_route_tokens_refuses_what_it_cannot_route(tiny_models):
    model = tiny_models("llama")
    calm, _ = _plans(model)
    ids, _ = _batch(model, [6, 6])
    with fs.attach(model, {"calm": calm, "other": calm}, backend="torch") as h:
        for bad in (torch.tensor([True]), torch.tensor([1 + 0j]), torch.tensor([1.0]), torch.zeros(0, dtype=torch.long),
                    torch.ones(1, 1, 1, dtype=torch.long), [1]):
            with pytest.raises(fs.AttachError, match="route_tokens: plan_ids must be a non-empty integer tensor"):
                h.route_tokens(bad, torch.tensor([3]))
        with pytest.raises(fs.AttachError, match=r"prompt_lens must be in \[0, 2\*\*62\)"):
            h.route_tokens(torch.tensor([1]), torch.tensor([-1]))
        h.route_tokens(torch.tensor([1, 1, 1]), torch.tensor([3]))  # broadcasts to [batch, 3] only
        with pytest.raises(fs.AttachError, match=r"plan_ids has shape \[3\].*\[batch, seq\] = \[2, 6\]"):
            model(ids)


def test_unrouted_forward_says_what_is_attached(tiny_models):
    model = tiny_models("llama")
    calm, _ = _plans(model)
    ids, _ = _batch(model, [4])
    with fs.attach(model, {}, backend="torch", capacity=2, sites="all") as h:
        with pytest.raises(fs.AttachError, match="no plan is attached to this handle yet"):
            model(ids)
        h.add_plan("calm", calm)
        with pytest.raises(fs.AttachError, match="plan 'calm' was added with add_plan"):
            model(ids)
        h.add_plan("two", calm)
        with pytest.raises(fs.AttachError, match="2 plans are attached"):
            model(ids)
