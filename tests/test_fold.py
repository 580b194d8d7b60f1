"""`fold` backend (static plans folded into weights) and `auto` (fold what folds, fuse the rest)."""

import copy
import logging

import pytest
import torch
import torch.nn as nn
from conftest import FAMILIES, patched_forward

import fusesteer as fs
from fusesteer.runtime.compat import output_cache, with_cache
from fusesteer.runtime.families import model_parts
from fusesteer.testing import FP32_ABS, logit_tolerance

FOLD_SITES = ("attn.o_proj.in", "mlp.down_proj.in", "mlp.out")


# ------------------------------------------------------------------------------------------------
# helpers
# ------------------------------------------------------------------------------------------------
def ids_for(model, batch=2, length=7, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(1, model.config.vocab_size, (batch, length), generator=g)


def greedy(model, ids, steps=8):
    """Prefill + `steps` greedy decode steps on the KV cache: (tokens [B, steps], logits [B, steps, V])."""
    with torch.no_grad():
        out = model(ids, use_cache=True)
        cache, last = output_cache(out), out.logits[:, -1]
        toks, logits = [], []
        for _ in range(steps):
            nxt = last.argmax(-1, keepdim=True)
            toks.append(nxt)
            logits.append(last)
            last = model(nxt, use_cache=True, **with_cache(model, cache)).logits[:, -1]
    return torch.cat(toks, 1), torch.stack(logits, 1)


def bits(t):
    return t.detach().reshape(-1).contiguous().view(torch.uint8).clone()


def snapshot(model):
    return {k: bits(v) for k, v in model.state_dict().items()}


def assert_bit_identical(model, snap):
    now = model.state_dict()
    assert set(now) == set(snap)
    for k, v in now.items():
        assert torch.equal(bits(v), snap[k]), k


def module_state(model):
    return {n: (set(m.__dict__), set(m._parameters), len(m._forward_hooks), len(m._forward_pre_hooks))
            for n, m in model.named_modules()}


def foldable_plan(model, seed=0, scale=0.5, layer_out=None):
    """Gains and biases, sparse and dense, on every site that folds on this model's family (what
    ``FoldBackend.support`` declares): ``attn.o_proj.in`` on every layer, ``mlp.down_proj.in`` and ``mlp.out`` on
    the layers with one ``down_proj`` (not a sparse MoE layer's routed experts), and there an additive
    ``layer.out`` where nothing sits between ``down_proj`` and the residual add (pre-norm layouts;
    ``layer_out=False``: none)."""
    g = torch.Generator().manual_seed(seed)
    plan = fs.SteeringPlan.for_model(model)
    spec = plan.spec
    parts = model_parts(model)
    layer_out = parts.family.layout == "pre" if layer_out is None else layer_out
    dense = [i for i in range(spec.num_layers) if "mlp.down_proj.in" in parts.sites_of(i)]
    assert dense, "no layer with a single down_proj: the plan would miss two of the three fold sites"
    for layer in range(spec.num_layers):
        for j, site in enumerate(FOLD_SITES):
            if site != "attn.o_proj.in" and layer not in dense:
                continue
            w = spec.site_width(site)
            if (layer + j) % 2:  # sparse gains + biases on those dims
                dims = torch.randperm(w, generator=g)[: max(2, w // 6)]
                n = dims.numel()
            else:
                dims, n = None, w
            a = 1 + scale * (torch.rand(n, generator=g) - 0.5) * 2
            b = scale * torch.randn(n, generator=g)
            plan.add(layer=layer, site=site, a=a, b=b, dims=dims)
        if layer_out and layer in dense:
            plan.add(layer=layer, site="layer.out", b=scale * torch.randn(spec.hidden_size, generator=g))
    # a second entry composing at one site (a2*a1, a2*b1 + b2)
    plan.add(layer=dense[0], site="mlp.out", a=0.9, b=0.1 * torch.randn(spec.hidden_size, generator=g))
    return plan


def no_patches(model):
    for n, m in model.named_modules():
        assert patched_forward(m) is None, n
        assert not m._forward_hooks and not m._forward_pre_hooks, n


def kept_by_undo(handle):
    """Bytes of the tensors the restore functions hold (measured on the patcher, not from the report)."""
    params = {id(p) for p in handle.model.parameters()}
    total = 0
    for item in handle.patcher._undo:
        if item[0] != "fn":
            continue
        for v in item[1].__defaults__ or ():
            if isinstance(v, torch.Tensor) and id(v) not in params:
                total += v.numel() * v.element_size()
    return total


# ------------------------------------------------------------------------------------------------
# fold vs reference
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", FAMILIES)
def test_fold_matches_reference_fp32(tiny_models, family):
    model = tiny_models(family)
    plan = foldable_plan(model, seed=FAMILIES.index(family))
    ids = ids_for(model)
    with torch.no_grad():
        vanilla = model(ids).logits
    res = {}
    for backend in ("reference", "fold"):
        with fs.attach(model, plan, backend=backend):
            if backend == "fold":
                no_patches(model)  # zero run-time cost: the model runs its own forwards
            with torch.no_grad():
                prefill = model(ids).logits
            toks, logits = greedy(model, ids, 8)
        res[backend] = (prefill, toks, logits)
    assert (res["reference"][0] - vanilla).abs().max() > 1e-2, "plan had no effect: test would be vacuous"
    assert (res["fold"][0] - res["reference"][0]).abs().max() <= FP32_ABS
    assert torch.equal(res["fold"][1], res["reference"][1])
    assert (res["fold"][2] - res["reference"][2]).abs().max() <= FP32_ABS


@pytest.mark.parametrize("family", FAMILIES)
def test_fold_bf16_within_tolerance(tiny_models, family):
    """bf16: folded weights are rounded once to bf16. Stated tolerance: the folded model's distance to the
    exact fp32 result is at most 2x the reference backend's own bf16 distance + 0.02, and the two bf16
    results differ by at most 2% of max|logit| + 0.01 (the `torch` backend's bf16 tolerance)."""
    model = tiny_models(family, torch.bfloat16)
    plan = foldable_plan(model, seed=7, scale=0.3)
    ids = ids_for(model)
    exact = copy.deepcopy(model).float()  # same weight values, fp32 math
    with fs.attach(exact, plan, backend="reference"), torch.no_grad():
        truth = exact(ids).logits
    out = {}
    for backend in ("reference", "fold"):
        with fs.attach(model, plan, backend=backend), torch.no_grad():
            out[backend] = model(ids).logits.float()
    err_ref = (out["reference"] - truth).abs().max().item()
    err_fold = (out["fold"] - truth).abs().max().item()
    assert err_fold <= 2 * err_ref + 0.02, (err_fold, err_ref)
    tol = logit_tolerance("bf16", "fold", out["reference"].abs().max().item())
    assert (out["fold"] - out["reference"]).abs().max().item() <= tol


def test_fold_existing_biases_scaled_and_restored():
    """Linears that already have a bias: mlp.out gains scale it, input biases add W·b to it."""
    from fusesteer.testing import tiny

    model = tiny("llama", seed=1, attention_bias=True, mlp_bias=True)
    assert model.model.layers[0].mlp.down_proj.bias is not None
    assert model.model.layers[0].self_attn.o_proj.bias is not None
    plan = foldable_plan(model, seed=3)
    ids = ids_for(model)
    snap = snapshot(model)
    with fs.attach(model, plan, backend="reference"), torch.no_grad():
        ref = model(ids).logits
    with fs.attach(model, plan, backend="fold") as h, torch.no_grad():
        got = model(ids).logits
        assert h.report["created_biases"] == []
        assert all(m["bias"] == "changed" for m in h.report["modules"])
    assert (got - ref).abs().max() <= FP32_ABS
    assert_bit_identical(model, snap)


# ------------------------------------------------------------------------------------------------
# restore
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_detach_restores_state_dict_bit_exactly(tiny_models, family, dtype):
    model = tiny_models(family, dtype)
    plan = foldable_plan(model, seed=5)
    snap = snapshot(model)
    names = [n for n, _ in model.named_parameters()]
    mods = module_state(model)
    ids = ids_for(model)
    with torch.no_grad():
        vanilla = model(ids).logits
    with fs.attach(model, plan, backend="fold") as h:
        assert h.report["created_biases"], "plan should have created biases (tiny models have none)"
        assert [n for n, _ in model.named_parameters()] != names
    assert_bit_identical(model, snap)
    assert [n for n, _ in model.named_parameters()] == names
    assert module_state(model) == mods
    # an exception inside the with block restores too
    with pytest.raises(ZeroDivisionError):
        with fs.attach(model, plan, backend="fold"):
            assert not all(torch.equal(bits(v), snap[k]) for k, v in model.state_dict().items()
                           if k in snap)
            1 / 0
    assert_bit_identical(model, snap)
    assert [n for n, _ in model.named_parameters()] == names
    with torch.no_grad():
        assert torch.equal(model(ids).logits, vanilla)


def test_attach_inside_inference_mode(tiny_models):
    """paired_decode_steps attaches inside torch.inference_mode(): created biases must be normal tensors."""
    model = tiny_models("qwen3")
    plan = foldable_plan(model, seed=2)
    snap = snapshot(model)
    ids = ids_for(model)
    with torch.inference_mode():
        with fs.attach(model, plan, backend="fold"):
            got = model(ids).logits
            bias = model.model.layers[0].mlp.down_proj.bias
            assert bias is not None and not bias.is_inference()
    assert_bit_identical(model, snap)
    with fs.attach(model, plan, backend="reference"), torch.no_grad():
        ref = model(ids).logits
    assert (got - ref).abs().max() <= FP32_ABS


# ------------------------------------------------------------------------------------------------
# memory
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_restore_keeps_only_touched_slices(tiny_models, dtype):
    model = tiny_models("llama", dtype)
    spec = fs.ModelSpec.from_model(model)
    esize = torch.tensor([], dtype=dtype).element_size()
    g = torch.Generator().manual_seed(0)
    plan = fs.SteeringPlan.for_model(model)
    expect_slices = expect_idx = 0
    ks = {(0, "attn.o_proj.in"): 5, (2, "attn.o_proj.in"): 3, (1, "mlp.down_proj.in"): 7, (2, "mlp.out"): 4}
    for (layer, site), k in ks.items():
        dims = torch.randperm(spec.site_width(site), generator=g)[:k]
        plan.add(layer=layer, site=site, a=1 + torch.rand(k, generator=g), dims=dims)
        lin = (model.model.layers[layer].self_attn.o_proj if site == "attn.o_proj.in"
               else model.model.layers[layer].mlp.down_proj)
        out_f, in_f = lin.weight.shape
        expect_slices += k * (in_f if site == "mlp.out" else out_f) * esize  # k rows or k columns
        expect_idx += k * 8  # int64 indices of the touched columns/rows
    with fs.attach(model, plan, backend="fold") as h:
        r = h.report
        assert r["restore_slice_bytes"] == expect_slices
        assert r["restore_index_bytes"] == expect_idx
        assert r["restore_bias_bytes"] == 0 and r["created_biases"] == []  # pure gains: no bias
        assert r["restore_bytes"] == expect_slices + expect_idx
        assert kept_by_undo(h) == r["restore_bytes"]
        assert r["restore_bytes"] < 0.02 * r["model_bytes"]

    # a dense gain keeps the whole weight (once), never more
    dense = fs.SteeringPlan.for_model(model)
    dense.add(layer=1, site="mlp.down_proj.in", a=1 + torch.rand(spec.intermediate_size, generator=g))
    dense.add(layer=1, site="mlp.out", a=1 + torch.rand(spec.hidden_size, generator=g))
    with fs.attach(model, dense, backend="fold") as h:
        w = model.model.layers[1].mlp.down_proj.weight
        assert h.report["restore_bytes"] == w.numel() * esize
        assert h.report["modules"][0]["full_copy"]
        assert kept_by_undo(h) == h.report["restore_bytes"]


# ------------------------------------------------------------------------------------------------
# refusals
# ------------------------------------------------------------------------------------------------
def _gains(model, layer, site, k=4, gating="all"):
    p = fs.SteeringPlan.for_model(model)
    p.add(layer=layer, site=site, a=torch.full((k,), 1.5), dims=torch.arange(k), gating=gating)
    return p


def _refuses(model, plan, match):
    snap = snapshot(model)
    mods = module_state(model)
    with pytest.raises(fs.AttachError, match=match):
        fs.attach(model, plan, backend="fold")
    assert_bit_identical(model, snap)
    assert module_state(model) == mods
    assert getattr(model, "_fusesteer_handle", None) is None


def test_refuses_per_row_plans(tiny_models):
    model = tiny_models("llama")
    p = _gains(model, 0, "attn.o_proj.in")
    _refuses(model, {"x": p, "y": p.copy()}, r"cannot fold the plans \['x', 'y'\]: 2 plans are attached for "
                                             r"per-row routing")


def test_refuses_gated_entry(tiny_models):
    model = tiny_models("llama")
    p = _gains(model, 0, "mlp.out")
    p.extend(_gains(model, 1, "attn.o_proj.in", gating="prompt"))
    _refuses(model, p, r"cannot fold entry 1 \(layer=1, site='attn.o_proj.in', gating='prompt'\): it is gated "
                       r"to 'prompt' tokens")


def test_refuses_layer_out_gain(tiny_models):
    model = tiny_models("qwen2")
    p = _gains(model, 2, "layer.out")
    _refuses(model, p, r"entry 0 \(layer=2, site='layer.out', gating='all'\): it scales the residual stream "
                       r"\(a != 1\)")


@pytest.mark.parametrize("family", ["gemma2", "gemma3"])
def test_refuses_gemma_layer_out(tiny_models, family):
    model = tiny_models(family)
    p = fs.SteeringPlan.for_model(model)
    p.add(layer=1, site="layer.out", b=torch.ones(p.spec.hidden_size))
    _refuses(model, p, rf"entry 0 \(layer=1, site='layer.out'.*on {family} the post_feedforward_layernorm")


def test_refuses_bitsandbytes_weights():
    bnb = pytest.importorskip("bitsandbytes")
    from fusesteer.testing import tiny

    model = tiny("llama", seed=0)
    old = model.model.layers[1].mlp.down_proj
    q = bnb.nn.Linear8bitLt(old.in_features, old.out_features, bias=False, has_fp16_weights=False)
    model.model.layers[1].mlp.down_proj = q
    p = _gains(model, 1, "mlp.down_proj.in")
    _refuses(model, p, r"model.layers.1.mlp.down_proj is a bitsandbytes Linear8bitLt")
    # auto runs it fused instead and still matches the reference
    ids = ids_for(model)
    with fs.attach(model, p, backend="reference"), torch.no_grad():
        ref = model(ids).logits
    with fs.attach(model, p, backend="auto") as h, torch.no_grad():
        assert h.report["folded"] == [] and h.report["fused_reasons"] == {"bitsandbytes": 1}
        assert torch.allclose(model(ids).logits, ref, atol=1e-5, rtol=0)


def test_refuses_shared_and_tied_weights():
    from fusesteer.testing import tiny

    model = tiny("llama", seed=0)
    layers = model.model.layers
    layers[2].self_attn.o_proj.weight = layers[0].self_attn.o_proj.weight  # one Parameter, two modules
    _refuses(model, _gains(model, 0, "attn.o_proj.in"),
             r"model.layers.0.self_attn.o_proj.weight shares its memory with model.layers.2.self_attn.o_proj.weight")
    # a weight that is a view into the embedding matrix (tied to the embeddings)
    model = tiny("llama", seed=0)
    emb = model.model.embed_tokens.weight
    with torch.no_grad():
        model.model.layers[1].self_attn.o_proj.weight = nn.Parameter(emb[: emb.shape[1]])
    _refuses(model, _gains(model, 1, "attn.o_proj.in"), r"shares its memory with model.embed_tokens.weight")
    # the same module registered in two layers
    model = tiny("llama", seed=0)
    model.model.layers[1].mlp.down_proj = model.model.layers[0].mlp.down_proj
    _refuses(model, _gains(model, 0, "mlp.out"), r"down_proj.weight shares its memory with")


def test_refuses_non_finite_fold(tiny_models):
    model = tiny_models("llama", torch.float16)
    p = fs.SteeringPlan.for_model(model)
    p.add(layer=0, site="mlp.out", a=torch.full((p.spec.hidden_size,), 1e7))  # > fp16 max (65504) once scaled
    snap = snapshot(model)
    with pytest.raises(fs.NonFiniteActivationError, match="non-finite weights in torch.float16"):
        fs.attach(model, p, backend="fold")
    assert_bit_identical(model, snap)


def test_static_handle_refuses_update_and_unsteered_rows(tiny_models):
    model = tiny_models("llama")
    p = _gains(model, 0, "attn.o_proj.in")
    with fs.attach(model, p, backend="fold") as h:
        with pytest.raises(fs.AttachError, match="bakes values into weights"):
            h.update(p.scaled(2.0))
        with pytest.raises(fs.AttachError, match="folded the plan into the weights"):
            h.route([None, "plan"])
        with pytest.raises(fs.AttachError, match="folded the plan into the weights"):
            h.route_all(None)
        h.route(["plan", "plan"])  # every row steered: fine


# ------------------------------------------------------------------------------------------------
# auto
# ------------------------------------------------------------------------------------------------
def _auto_vs_reference(model, plan, rows=None):
    ids = ids_for(model, batch=3 if rows else 2)
    with fs.attach(model, plan, backend="reference") as h, torch.no_grad():
        if rows:
            h.route(rows)
        ref = model(ids).logits
        ref_t, ref_l = greedy(model, ids, 6)
    snap = snapshot(model)
    with fs.attach(model, plan, backend="auto") as h, torch.no_grad():
        if rows:
            h.route(rows)
        got = model(ids).logits
        got_t, got_l = greedy(model, ids, 6)
        report = dict(h.report)
    assert_bit_identical(model, snap)
    assert (got - ref).abs().max() <= FP32_ABS
    assert torch.equal(got_t, ref_t)
    assert (got_l - ref_l).abs().max() <= FP32_ABS
    return report


def test_auto_gemma_folds_o_proj_fuses_layer_out(tiny_models, caplog):
    model = tiny_models("gemma2")
    spec = fs.ModelSpec.from_model(model)
    g = torch.Generator().manual_seed(1)
    plan = fs.SteeringPlan.for_model(model)
    for layer in range(spec.num_layers):
        plan.add(layer=layer, site="layer.out", b=0.5 * torch.randn(spec.hidden_size, generator=g))
        plan.add(layer=layer, site="attn.o_proj.in", a=1 + torch.rand(6, generator=g), dims=torch.arange(0, 12, 2))
    with caplog.at_level(logging.INFO, logger="fusesteer"):
        report = _auto_vs_reference(model, plan)
    n = spec.num_layers
    assert report["folded"] == [[l, "attn.o_proj.in"] for l in range(n)]
    assert [(d["layer"], d["site"]) for d in report["fused"]] == [(l, "layer.out") for l in range(n)]
    assert report["fused_backend"] == "torch"
    assert report["fused_reasons"] == {"gemma2 layer.out": n}
    lines = [r.getMessage() for r in caplog.records if r.name == "fusesteer" and r.levelno == logging.INFO]
    assert lines == [f"auto: folded {n} entries (attn.o_proj.in) into {n} weights; fused {n} entries "
                     f"(layer.out; why not folded: gemma2 layer.out: {n}) via torch"]


def test_auto_everything_folds_means_no_patches(tiny_models, caplog):
    model = tiny_models("qwen3")
    plan = foldable_plan(model, seed=4)
    with caplog.at_level(logging.INFO, logger="fusesteer"):
        with fs.attach(model, plan, backend="auto") as h:
            no_patches(model)
            assert h.report["fused"] == [] and h.report["fused_backend"] is None
    assert "nothing left to fuse" in caplog.records[-1].getMessage()
    report = _auto_vs_reference(model, plan)
    assert len(report["folded"]) == 4 * model.config.num_hidden_layers


def test_auto_gated_mlp_out_keeps_layer_out_fused(tiny_models):
    """layer.out folds into down_proj's bias only if the mlp.out map before it folds too."""
    model = tiny_models("llama")
    spec = fs.ModelSpec.from_model(model)
    g = torch.Generator().manual_seed(2)
    plan = fs.SteeringPlan.for_model(model)
    plan.add(layer=0, site="mlp.out", a=1 + torch.rand(spec.hidden_size, generator=g), gating="generated")
    plan.add(layer=0, site="layer.out", b=torch.randn(spec.hidden_size, generator=g))
    plan.add(layer=1, site="layer.out", b=torch.randn(spec.hidden_size, generator=g))
    plan.add(layer=1, site="mlp.down_proj.in", a=1 + torch.rand(spec.intermediate_size, generator=g))
    report = _auto_vs_reference(model, plan)
    assert report["folded"] == [[1, "layer.out"], [1, "mlp.down_proj.in"]]
    assert report["fused_reasons"] == {"gated": 1, "mlp.out not folded": 1}


def test_auto_per_row_plans_all_fused(tiny_models):
    model = tiny_models("qwen2")
    a = foldable_plan(model, seed=8)
    b = foldable_plan(model, seed=9)
    report = _auto_vs_reference(model, {"a": a, "b": b}, rows=["a", None, "b"])
    assert report["folded"] == [] and report["fused_reasons"] == {"per-row plans": len(report["fused"])}


def test_auto_update_refolds_values(tiny_models):
    """update() under auto refolds: same result as attaching the new plan; the split may change."""
    model = tiny_models("llama")
    snap = snapshot(model)
    p1 = foldable_plan(model, seed=21)
    p2 = foldable_plan(model, seed=22)
    p3 = p2.copy()  # same (layer, site) set, but layer.out 0 now scales: it moves to the fused path
    for e in p3.entries:
        if (e.layer, e.site) == (0, "layer.out"):
            e.a = torch.tensor(1.3)
    ids = ids_for(model)
    want = {}
    for name, p in (("p2", p2), ("p3", p3)):
        with fs.attach(model, p, backend="reference"), torch.no_grad():
            want[name] = model(ids).logits
    with fs.attach(model, p1, backend="auto") as h, torch.no_grad():
        assert h.report["fused"] == []
        h.update(p2)
        assert (model(ids).logits - want["p2"]).abs().max() <= FP32_ABS
        assert h.report["fused"] == []
        h.update(p3)
        assert (model(ids).logits - want["p3"]).abs().max() <= FP32_ABS
        assert [(d["layer"], d["site"]) for d in h.report["fused"]] == [(0, "layer.out")]
    assert_bit_identical(model, snap)
    no_patches(model)


def test_auto_unsteered_rows_move_folds_to_fused_path(tiny_models):
    model = tiny_models("gemma3")
    plan = foldable_plan(model, seed=23, layer_out=False)
    ids = ids_for(model, batch=2)
    snap = snapshot(model)
    with torch.no_grad():
        vanilla = model(ids).logits
    with fs.attach(model, plan, backend="reference"), torch.no_grad():
        ref = model(ids).logits
    with fs.attach(model, plan, backend="auto") as h, torch.no_grad():
        assert h.report["fused"] == []
        h.route([None, "plan"])
        assert h.report["folded"] == [] and set(h.report["fused_reasons"]) == {"per-row routing"}
        assert_bit_identical(model, snap)  # weights back to the originals while still attached
        got = model(ids).logits
    assert torch.equal(got[0], vanilla[0])  # the unsteered row is bit-identical to no steering
    assert (got[1] - ref[1]).abs().max() <= FP32_ABS
    assert_bit_identical(model, snap)
    no_patches(model)


# ------------------------------------------------------------------------------------------------
# weights written while a plan is folded into them
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", ["fold", "auto"])
def test_load_state_dict_refused_while_folded(tiny_models, backend):
    model = copy.deepcopy(tiny_models("llama"))
    plan = fs.SteeringPlan.for_model(model)
    w = model.config.intermediate_size
    plan.add(layer=0, site="mlp.down_proj.in", a=1 + 0.1 * torch.randn(w, generator=torch.Generator().manual_seed(0)))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    new = {k: v + 0.5 for k, v in before.items()}
    with fs.attach(model, plan, backend=backend) as h:
        for target in (model, model.model.layers[0].mlp.down_proj, model.model.layers[1]):
            sd = {k[len(p):]: v for p in [_prefix(model, target)] for k, v in new.items() if k.startswith(p)}
            with pytest.raises(fs.AttachError, match="cannot load a state dict .* nothing was loaded"):
                target.load_state_dict(sd)
        assert h.attached
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    with fs.attach(model, plan, backend="torch"):  # nothing folded: loading is the user's business
        model.load_state_dict(new)
    assert torch.equal(model.model.layers[0].mlp.down_proj.weight, new["model.layers.0.mlp.down_proj.weight"])


def _prefix(model, target) -> str:
    name = next(n for n, m in model.named_modules() if m is target)
    return f"{name}." if name else ""


@pytest.mark.parametrize("how", ["copy_", "data_copy_", "data_assign", "set_"])
def test_weights_written_behind_fusesteers_back_are_kept(tiny_models, how):
    """A folded weight written while attached (not through load_state_dict) keeps what was written, and detach
    says so, instead of silently putting the pre-attach values back over it."""
    model = copy.deepcopy(tiny_models("llama"))
    plan = fs.SteeringPlan.for_model(model)
    plan.add(layer=0, site="mlp.down_proj.in", a=1.5, b=0.1)
    lin = model.model.layers[0].mlp.down_proj
    other_lin = model.model.layers[1].mlp.down_proj
    other_before = other_lin.weight.detach().clone()
    h = fs.attach(model, plan, backend="fold")
    written = torch.full_like(lin.weight, 0.25)
    with torch.no_grad():
        if how == "copy_":
            lin.weight.copy_(written)
        elif how == "data_copy_":
            lin.weight.data.copy_(written)
        elif how == "data_assign":
            lin.weight.data = written.clone()
        else:
            lin.weight.set_(written.clone())
    with pytest.warns(RuntimeWarning, match=r"model\.layers\.0\.mlp\.down_proj\.weight was written while a plan "
                                            r"was folded into it"):
        h.detach()
    assert torch.equal(lin.weight, written)
    assert lin.bias is None  # the bias the fold created is removed: it was not written
    assert torch.equal(other_lin.weight, other_before)
