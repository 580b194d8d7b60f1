"""fusesteer beside other code on the same model or process: a stale carried norm is never used when something
else ran (triton); an instance-level forward or hooks installed by another library are kept (or refused by
triton, naming them), and their output hooks see the steered output on every backend; two models steered in
two threads match running alone."""

import threading

import pytest
import torch
from conftest import rand_ids, random_plan

import fusesteer as fs


# ------------------------------------------------------------------------------------------------
# triton: a stale carried norm is never used
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["no_grad", "inference_mode"])
@pytest.mark.parametrize("edit", ["layer output in place", "norm hook"])
def test_triton_carry_is_not_used_when_something_else_ran(tiny_models, mode, edit):
    """Between two layers another library's hook, added after attach, edits the layer's output in place
    (under inference mode the tensor has no version counter) or sits on the next layer's input norm (which the
    carry would skip): the carried rmsnorm(s) must not be used."""
    model = tiny_models("llama")
    ids = rand_ids(model)
    plan = random_plan(model, fs.SITES, seed=3)
    ctx = torch.no_grad if mode == "no_grad" else torch.inference_mode

    def in_place(mod, args, out):
        out.add_(0.5)  # not a scaling: rmsnorm would not see that

    def norm_hook(mod, args, out):
        return out * 0.7

    out = {}
    for backend in ("reference", "triton"):
        with fs.attach(model, plan, backend=backend):
            if edit == "norm hook":
                hooks = [model.model.layers[1].input_layernorm.register_forward_hook(norm_hook),
                         model.model.norm.register_forward_hook(norm_hook)]
            else:
                hooks = [layer.register_forward_hook(in_place) for layer in model.model.layers]
            try:
                with ctx():
                    out[backend] = model(ids).logits.clone()
            finally:
                for hk in hooks:
                    hk.remove()
    if "triton" in out:
        torch.testing.assert_close(out["triton"], out["reference"], atol=1e-4, rtol=1e-4)


# ------------------------------------------------------------------------------------------------
# an instance-level forward (or hooks) put there by another library
# ------------------------------------------------------------------------------------------------
def test_foreign_forward_is_kept_by_torch_and_refused_by_triton(tiny_models):
    model = tiny_models("llama")
    ids = rand_ids(model)
    plan = random_plan(model, fs.SITES, seed=4)
    layer, mlp = model.model.layers[1], model.model.layers[2].mlp
    orig_layer, orig_mlp = layer.forward, mlp.forward

    def layer_wrapper(*a, **k):
        return orig_layer(*a, **k) * 1.3

    def mlp_wrapper(x):
        return orig_mlp(x) + 0.25
    layer.forward, mlp.forward = layer_wrapper, mlp_wrapper
    try:
        with torch.no_grad():
            base = model(ids).logits
        out = {}
        for backend in ("reference", "torch", "auto"):
            with fs.attach(model, plan, backend=backend), torch.no_grad():
                out[backend] = model(ids).logits
            assert layer.forward is layer_wrapper and mlp.forward is mlp_wrapper
        assert not torch.equal(out["reference"], base)
        assert torch.equal(out["torch"], out["reference"])
        torch.testing.assert_close(out["auto"], out["reference"], atol=1e-4, rtol=1e-4)
        with pytest.raises(fs.AttachError, match=r"model\.layers\.1 has an instance-level forward \(function "
                                                 r"'.*layer_wrapper'\).*backend='torch'"):
            fs.attach(model, plan, backend="triton")
        assert layer.forward is layer_wrapper and not hasattr(model, "_fusesteer_handle")
        del layer.forward
        with pytest.raises(fs.AttachError, match=r"model\.layers\.2\.mlp has an instance-level forward"):
            fs.attach(model, plan, backend="triton")
    finally:
        layer.__dict__.pop("forward", None)
        mlp.__dict__.pop("forward", None)
    # hooks on a module triton never calls: refused at attach, and at the first forward if added later
    hk = model.model.layers[0].post_attention_layernorm.register_forward_hook(lambda m, a, o: o * 2)
    try:
        with pytest.raises(fs.AttachError, match=r"model\.layers\.0\.post_attention_layernorm has 1 forward hook"):
            fs.attach(model, plan, backend="triton")
        with fs.attach(model, plan, backend="reference"), torch.no_grad():
            want = model(ids).logits
        with fs.attach(model, plan, backend="torch"), torch.no_grad():
            assert torch.equal(model(ids).logits, want)
    finally:
        hk.remove()
    with fs.attach(model, plan, backend="triton"):
        hk = model.model.layers[2].mlp.register_forward_pre_hook(lambda m, a: None)
        try:
            with pytest.raises(fs.AttachError, match=r"model\.layers\.2\.mlp has 1 forward hook"), torch.no_grad():
                model(ids)
        finally:
            hk.remove()
        with torch.no_grad():
            model(ids)


# ------------------------------------------------------------------------------------------------
# forward hooks of another library that edit a steered layer's (or MLP's) output
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("where", ["layer", "mlp"])
def test_foreign_output_hooks_see_the_steered_output_on_every_backend(tiny_models, where):
    """An output site is its module's output: on every backend the map runs before the module's forward hooks
    (transformers' own output capture, another library's edit), so a hook that edits a steered layer's output
    edits the steered output everywhere. The contract probe on the hooked layer (layer 0, the first of its
    class) passes instead of blaming transformers."""
    from fusesteer.runtime import contract

    model = tiny_models("llama")
    ids = rand_ids(model)
    site, mod = ("layer.out", model.model.layers[0]) if where == "layer" else ("mlp.out", model.model.layers[0].mlp)
    w = model.config.hidden_size
    plan = fs.SteeringPlan.for_model(model)
    plan.add(layer=0, site=site, a=1.5 + torch.rand(w, generator=torch.Generator().manual_seed(1)), b=0.3)
    vec = torch.randn(w, generator=torch.Generator().manual_seed(2))

    def shift_output(m, args, out):
        return (out[0] + vec,) + tuple(out[1:]) if isinstance(out, tuple) else out + vec
    hk = mod.register_forward_hook(shift_output)
    n_hooks = len(mod._forward_hooks)  # transformers may have its own output-capture hook there too
    try:
        with torch.no_grad():
            hooked = model(ids).logits
        out = {}
        for backend in ("reference", "torch", "auto", "triton"):
            contract._VERIFIED.clear()  # the first attach in a process probes the hooked layer
            if backend == "triton" and where == "mlp":  # triton fuses the dense MLP: it would bypass the hook
                with pytest.raises(fs.AttachError, match=r"model\.layers\.0\.mlp has 1 forward hook .* bypass"):
                    fs.attach(model, plan, backend=backend)
                continue
            with fs.attach(model, plan, backend=backend), torch.no_grad():
                out[backend] = model(ids).logits
            assert len(mod._forward_hooks) == n_hooks
    finally:
        hk.remove()
    plan_vec = plan.copy()  # the same map, and the hook's shift after it, as one plan: what the hook must see
    plan_vec.add(layer=0, site=site, b=vec)
    with fs.attach(model, plan_vec, backend="reference"), torch.no_grad():
        want = model(ids).logits
    assert not torch.allclose(out["reference"], hooked)
    torch.testing.assert_close(out["reference"], want, atol=1e-5, rtol=1e-5)
    assert torch.equal(out["torch"], out["reference"])
    torch.testing.assert_close(out["auto"], out["reference"], atol=1e-5, rtol=1e-5)
    if "triton" in out:
        torch.testing.assert_close(out["triton"], out["reference"], atol=1e-4, rtol=1e-4)


def test_foreign_pre_hook_on_down_proj_refused_by_triton(tiny_models):
    model = tiny_models("llama")
    ids = rand_ids(model)
    plan = random_plan(model, ["mlp.down_proj.in"], seed=4)
    hk = model.model.layers[1].mlp.down_proj.register_forward_pre_hook(lambda m, a: (a[0] * 1.1,))
    try:
        with fs.attach(model, plan, backend="reference"), torch.no_grad():
            want = model(ids).logits
        with fs.attach(model, plan, backend="torch"), torch.no_grad():
            assert torch.equal(model(ids).logits, want)
        with pytest.raises(fs.AttachError, match=r"model\.layers\.1\.mlp\.down_proj has 1 forward pre-hook"):
            fs.attach(model, plan, backend="triton")
    finally:
        hk.remove()


# ------------------------------------------------------------------------------------------------
# Concurrency
# ------------------------------------------------------------------------------------------------
def test_two_models_in_two_threads_match_running_alone():
    from fusesteer.testing import tiny

    models = [tiny("llama", seed=1), tiny("qwen3", seed=2)]
    plans = [random_plan(m, fs.SITES, seed=10 + i) for i, m in enumerate(models)]
    ids = [torch.randint(1, m.config.vocab_size, (2, 6), generator=torch.Generator().manual_seed(i))
           for i, m in enumerate(models)]

    def run(i):
        with fs.attach(models[i], plans[i], backend="torch"), torch.no_grad():
            return models[i].generate(ids[i], max_new_tokens=8, do_sample=False, pad_token_id=0)

    alone = [run(0), run(1)]
    results = [None, None]
    errors = []

    def worker(i):
        try:
            for _ in range(3):
                out = run(i)
                if results[i] is None:
                    results[i] = out
                assert torch.equal(out, alone[i])
        except Exception as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    for i in range(2):
        assert torch.equal(results[i], alone[i])
