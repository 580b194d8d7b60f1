"""The handle's lifecycle: a detached handle refuses every call; moving an attached model is refused and detach
restores it exactly; an exception anywhere (inside the with block, in a forward, while another plan detaches)
restores the model bit for bit on every backend; the non-finite guard checks every update and the first forward
of each phase and rolls rejected values back; API argument errors are named; attach never aliases the caller's
plan. (The randomized version of the same guarantees: test_lifecycle_fuzz.py.)"""

import json

import numpy as np
import pytest
import torch
from conftest import patched_forward, rand_ids, random_plan, small_plan

import fusesteer as fs


def _sd(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _assert_same_sd(model, sd):
    now = model.state_dict()
    assert set(now) == set(sd)
    for k, v in now.items():
        assert v.dtype == sd[k].dtype and torch.equal(v, sd[k]), k


def _assert_untouched(model, sd, ids, vanilla):
    _assert_same_sd(model, sd)
    for n, m in model.named_modules():
        assert patched_forward(m) is None and "_apply" not in m.__dict__, n
    assert not hasattr(model, "_fusesteer_handle")
    with torch.no_grad():
        assert torch.equal(model(ids).logits, vanilla)


def _foldable(model, seed=1, sparse=True):
    """A plan every backend takes, fold included: gains and biases at the linear-adjacent sites."""
    return random_plan(model, ["attn.o_proj.in", "mlp.down_proj.in", "mlp.out"], sparse=sparse, seed=seed)


# ------------------------------------------------------------------------------------------------
# a detached handle refuses every call and never touches the model
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", ["auto", "fold", "torch", "reference", "triton"])
def test_detached_handle_refuses_every_call(tiny_models, backend):
    model = tiny_models("llama")
    ids = rand_ids(model)
    with torch.no_grad():
        vanilla = model(ids).logits
    sd = _sd(model)
    h = fs.attach(model, _foldable(model, seed=1), backend=backend)
    h.detach()
    _assert_untouched(model, sd, ids, vanilla)
    p2 = _foldable(model, seed=2)
    calls = {
        "update()": lambda: h.update(p2),
        "update(name)": lambda: h.update("plan", p2),
        "route()": lambda: h.route(["plan", "plan"]),
        "route_all()": lambda: h.route_all("plan"),
        "route_all(None)": lambda: h.route_all(None),
        "route_tokens()": lambda: h.route_tokens(torch.ones(2, 6, dtype=torch.long),
                                                 torch.zeros(2, 1, dtype=torch.long)),
        "set_prompt_length()": lambda: h.set_prompt_length(3),
        "add_plan()": lambda: h.add_plan("other", p2),
        "remove_plan()": lambda: h.remove_plan("plan"),
        "with handle": lambda: h.__enter__(),
    }
    for what, call in calls.items():
        with pytest.raises(fs.AttachError, match="detached"):
            call()
        _assert_untouched(model, sd, ids, vanilla)
    h.detach()  # a second detach is a no-op
    with pytest.raises(fs.AttachError, match="detached"):
        with h:
            pass
    _assert_untouched(model, sd, ids, vanilla)


# ------------------------------------------------------------------------------------------------
# moving an attached model is refused before anything moves; detach restores exactly
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", ["fold", "auto", "torch", "reference"])
def test_moving_an_attached_model_is_refused(backend):
    from fusesteer.testing import tiny

    model = tiny("qwen2")  # private: it is moved at the end (non-persistent buffers would not come back)
    ids = rand_ids(model)
    with torch.no_grad():
        vanilla = model(ids).logits
    sd = _sd(model)
    h = fs.attach(model, _foldable(model), backend=backend)
    with torch.no_grad():
        steered = model(ids).logits
    moves = [lambda: model.to(torch.bfloat16), lambda: model.half(), lambda: model.double(),
             lambda: model.to("meta"), lambda: model.model.layers[1].to(torch.bfloat16),
             lambda: model.model.layers[1].mlp.down_proj.half(), lambda: model.lm_head.to(torch.float16),
             lambda: model.to(torch.float16)]
    for move in moves:
        with pytest.raises(fs.AttachError, match="while a fusesteer plan is attached: nothing was changed"):
            move()
        assert all(p.dtype == torch.float32 and p.device.type == "cpu" for p in model.parameters())
        with torch.no_grad():
            assert torch.equal(model(ids).logits, steered)
    model.to(torch.float32)  # moves that change nothing are fine
    model.float()
    model.cpu()
    model.to("cpu", torch.float32)
    with torch.no_grad():
        assert torch.equal(model(ids).logits, steered)
    h.detach()
    _assert_untouched(model, sd, ids, vanilla)
    model.to(torch.bfloat16)  # detached: moves work again
    assert model.model.layers[0].mlp.down_proj.weight.dtype == torch.bfloat16


def test_fold_restore_of_a_param_changed_behind_our_back_is_retryable(tiny_models):
    """A weight swapped through ``.data`` (no Module.to, so nothing could refuse it): detach names it, keeps
    that undo step, and a second detach() after putting it back restores bit for bit."""
    model = tiny_models("llama")
    ids = rand_ids(model)
    with torch.no_grad():
        vanilla = model(ids).logits
    sd = _sd(model)
    h = fs.attach(model, _foldable(model), backend="fold")
    w = model.model.layers[0].mlp.down_proj.weight
    folded = w.data
    w.data = folded.to(torch.bfloat16)
    with pytest.raises(fs.AttachError, match=r"model\.layers\.0\.mlp\.down_proj\.weight exactly: it is now "
                                             r"torch\.bfloat16.*call detach\(\) again"):
        h.detach()
    with pytest.raises(fs.AttachError, match="detach\\(\\) failed part-way"):
        h.update(_foldable(model, seed=2))
    w.data = folded
    h.detach()
    _assert_untouched(model, sd, ids, vanilla)
    h.detach()  # done: no-op


# ------------------------------------------------------------------------------------------------
# Exact restore
# ------------------------------------------------------------------------------------------------
def _snapshot(model):
    sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
    mods = {n: (dict(m.__dict__), dict(m._forward_hooks), dict(m._forward_pre_hooks)) for n, m in model.named_modules()}
    return sd, mods


def _assert_restored(model, snap, ids, vanilla):
    sd, mods = snap
    now = model.state_dict()
    assert set(now) == set(sd)
    for k, v in now.items():
        assert v.dtype == sd[k].dtype and torch.equal(v, sd[k]), k
    for n, m in model.named_modules():
        d, fh, ph = mods[n]
        assert set(m.__dict__) == set(d), n
        assert dict(m._forward_hooks) == fh and dict(m._forward_pre_hooks) == ph, n
        assert patched_forward(m) is None, n
    with torch.no_grad():
        assert torch.equal(model(ids).logits, vanilla)


BACKENDS_CPU = ["reference", "torch", "triton", "fold", "auto"]


class Boom(Exception):
    pass


@pytest.mark.parametrize("backend", BACKENDS_CPU)
@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_exact_restore_after_exceptions(tiny_models, backend, family):
    model = tiny_models(family)
    ids = torch.randint(1, model.config.vocab_size, (2, 5), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        vanilla = model(ids).logits
    snap = _snapshot(model)
    # a static plan (gating all) so that fold can take it; gains + biases at every site
    plan = random_plan(model, ["attn.o_proj.in", "mlp.down_proj.in", "mlp.out"], seed=3)
    if family == "llama" or backend != "fold":
        plan.extend(random_plan(model, ["layer.out"], seed=4).scaled(1.0) if backend != "fold" else
                    _additive(model))
    # 1. exception inside the with block (during generate)
    with pytest.raises(Boom):
        with fs.attach(model, plan, backend=backend):
            with torch.no_grad():
                model(ids)
            raise Boom()
    _assert_restored(model, snap, ids, vanilla)
    # 2. exception raised from inside the model's forward while steered
    def bad_hook(mod, args, out):
        raise Boom()
    h = model.model.layers[-1].register_forward_hook(bad_hook)
    try:
        with pytest.raises(Boom):
            with fs.attach(model, plan, backend=backend):
                with torch.no_grad():
                    model(ids)
    finally:
        h.remove()
    _assert_restored(model, snap, ids, vanilla)
    # 3. exception during attach (install fails half way)
    from fusesteer.runtime.patching import Patcher

    orig = Patcher.set_forward
    calls = {"n": 0}

    def flaky(self, module, fn):
        calls["n"] += 1
        if calls["n"] == 2:
            raise Boom()
        return orig(self, module, fn)
    Patcher.set_forward = flaky
    try:
        try:
            fs.attach(model, plan, backend=backend).detach()
        except Boom:
            pass
    finally:
        Patcher.set_forward = orig
    _assert_restored(model, snap, ids, vanilla)


def _additive(model):
    p = fs.SteeringPlan.for_model(model)
    for l in range(p.spec.num_layers):
        p.add(layer=l, site="layer.out", b=torch.randn(p.spec.hidden_size) * 0.1)
    return p


def test_detach_of_other_plan_raising_keeps_model_exact(tiny_models):
    """An exception while detaching one plan (a failing undo step) still restores everything else."""
    model = tiny_models("qwen2")
    ids = torch.randint(1, model.config.vocab_size, (1, 5), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        vanilla = model(ids).logits
    snap = _snapshot(model)
    h = fs.attach(model, random_plan(model, fs.SITES, seed=1), backend="torch")

    def failing():
        raise Boom()
    h.patcher._undo.insert(len(h.patcher._undo) // 2, ("fn", failing))
    with pytest.raises(Boom):
        h.detach()
    _assert_restored(model, snap, ids, vanilla)
    # and the model is usable again
    with fs.attach(model, random_plan(model, ["layer.out"], seed=2), backend="reference"):
        pass
    _assert_restored(model, snap, ids, vanilla)


# ------------------------------------------------------------------------------------------------
# the non-finite guard: every update, the first forward of each phase, rejected values rolled back
# ------------------------------------------------------------------------------------------------
def _plan_b(model, value, gating="all", layer=0):
    return fs.SteeringPlan.for_model(model).add(layer=layer, site="layer.out", b=torch.full((64,), value),
                                                gating=gating)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # the Triton interpreter's numpy overflow warning
@pytest.mark.parametrize("backend", ["torch", "reference", "auto", "triton"])
def test_rejected_update_leaves_the_old_values(tiny_models, backend):
    model = tiny_models("llama", torch.float16)
    ids = rand_ids(model, batch=1, seq=4)
    good = _plan_b(model, 0.1)
    h = fs.attach(model, good, backend=backend)
    try:
        with torch.no_grad():
            want = model(ids).logits
        assert torch.isfinite(want).all()
        report = json.loads(json.dumps(h.report))
        if backend == "auto":  # auto refolds inside update(): the refusal comes from update() itself
            with pytest.raises(fs.NonFiniteActivationError, match="non-finite bias in torch.float16"):
                h.update(_plan_b(model, 1e5))
        else:
            h.update(_plan_b(model, 1e5))
            with pytest.raises(fs.NonFiniteActivationError, match=r"layer 0, site 'layer.out'.*plan 'plan' \(set "
                                                                  r"by update\(\)\).*update\(\) of 'plan' was undone"):
                with torch.no_grad():
                    model(ids)
        assert float(h.plans["plan"].entries[0].b[0]) == pytest.approx(0.1)
        assert json.loads(json.dumps(h.report)) == report  # the report describes the values in place
        with torch.no_grad():
            assert torch.equal(model(ids).logits, want)
        # the next update is checked again
        with pytest.raises(fs.NonFiniteActivationError):
            h.update(_plan_b(model, -1e5))
            with torch.no_grad():
                model(ids)
        with torch.no_grad():
            assert torch.equal(model(ids).logits, want)
    finally:
        h.detach()


def test_guard_checks_the_first_forward_of_each_phase(tiny_models):
    model = tiny_models("llama", torch.float16)
    ids = rand_ids(model, batch=1, seq=4)
    bad = _plan_b(model, 1e5, gating="generated")
    with fs.attach(model, bad, backend="torch") as h, torch.no_grad():
        model(ids)  # prefill: prompt tokens only, the generated map has not run
        assert h.guard.pending["plan"] == {"generated"}
        with pytest.raises(fs.NonFiniteActivationError, match="layer 0, site 'layer.out'"):
            model.generate(ids, max_new_tokens=3, do_sample=False, pad_token_id=0)
    ok = _plan_b(model, 0.1, gating="generated")
    with fs.attach(model, ok, backend="torch") as h, torch.no_grad():
        model.generate(ids, max_new_tokens=3, do_sample=False, pad_token_id=0)
        assert not any(h.guard.pending.values())  # both phases ran finite: nothing is checked any more
        h.guard.begin(h._ids, h.router)
        assert not h.guard.checking
        h.update(_plan_b(model, 0.2, gating="generated"))
        assert h.guard.pending["plan"] == {"generated"}
    # a plan that is attached but not routed keeps its check pending without making other forwards check
    with fs.attach(model, {"a": ok, "b": _plan_b(model, 0.3)}, backend="torch") as h, torch.no_grad():
        h.route(["a"])
        model.generate(ids, max_new_tokens=2, do_sample=False, pad_token_id=0)
        assert not h.guard.pending["a"] and h.guard.pending["b"] == {"prompt", "generated"}
        h.guard.begin(h._ids, h.router)
        assert not h.guard.checking
        h.route(["a", "b"])
        h.guard.begin(h._ids, h.router)
        assert h.guard.checking
        h.guard.end(None, 5, h._ids, failed=True)


# ------------------------------------------------------------------------------------------------
# API papercuts
# ------------------------------------------------------------------------------------------------
def test_extend_is_atomic_and_self_extend_doubles_once(monkeypatch):
    p = small_plan()
    p.extend(p)
    assert len(p) == 2 and torch.equal(p.entries[1].b, p.entries[0].b)
    other = fs.SteeringPlan().add(layer=1, site="layer.out", b=torch.ones(8)).add(layer=7, site="layer.out", b=1.0)
    with pytest.raises(fs.PlanError, match="layer 7 is out of range"):
        p.extend(other)
    assert len(p) == 2
    from fusesteer.runtime import plan as plan_mod

    monkeypatch.setattr(plan_mod, "MAX_ENTRIES", 3)
    with pytest.raises(fs.PlanError, match="would have 4 entries"):
        p.extend(p)
    assert len(p) == 2
    with pytest.raises(fs.PlanError, match="expects a SteeringPlan"):
        p.extend([1, 2])


def test_routing_and_update_argument_errors(tiny_models):
    model = tiny_models("llama")
    p = random_plan(model, ["layer.out"], seed=1)
    with fs.attach(model, {"ab": p, "b": p}, backend="torch") as h:
        for rows, match in (("ab", "expects a list with one entry per batch row"), (None, "route_all"),
                            ([], "got no rows"), ({"ab": 1}, "expects a list"), (5, "expects a list")):
            with pytest.raises(fs.AttachError, match=match):
                h.route(rows)
        h.route(("ab", None))
        assert h.router.host_rows == [1, 0]
        with pytest.raises(fs.AttachError, match="expects a plan name or None"):
            h.route_all(1)
        with pytest.raises(fs.PlanError, match="expected a SteeringPlan, got dict"):
            h.update("ab", {})
        with pytest.raises(fs.AttachError, match="2 plans are attached"):
            h.update(p)
        with pytest.raises(fs.AttachError, match="expected a plan name"):
            h.update(p, p)
    with fs.attach(model, p, backend="torch") as h:
        with pytest.raises(fs.PlanError, match="expected a SteeringPlan, got dict"):
            h.update({})
        for bad in (-3, 2.5, True, "3", [1, -1], [], [2, 2.0]):
            with pytest.raises(fs.AttachError, match="set_prompt_length"):
                h.set_prompt_length(bad)
        h.set_prompt_length(np.int64(3))
        h.set_prompt_length([2, np.int32(1)])
        h.set_prompt_length(None)


def test_auto_replans_when_plans_are_added_or_routed(tiny_models):
    """auto folded plan 'a'; add_plan('b') + route_all('b') used to keep steering every row with the folded
    'a' (the fused path did not cover the folded sites, and route_all only re-planned for None)."""
    model = tiny_models("llama")
    ids = rand_ids(model)
    pa = random_plan(model, ["mlp.down_proj.in"], seed=1)
    pb = random_plan(model, ["mlp.down_proj.in"], seed=2)
    out = {}
    for backend in ("reference", "auto"):
        with fs.attach(model, {"a": pa}, backend=backend, sites="all", capacity=2) as h, torch.no_grad():
            out[backend, "a"] = model(ids).logits
            h.add_plan("b", pb)
            h.route_all("b")
            out[backend, "b"] = model(ids).logits
            h.remove_plan("b")
            h.route_all("a")
            out[backend, "a again"] = model(ids).logits
    for k in ("a", "b", "a again"):
        torch.testing.assert_close(out["auto", k], out["reference", k], atol=1e-4, rtol=1e-4)


def test_attach_never_binds_or_aliases_the_callers_plan(tiny_models):
    from fusesteer.testing import tiny

    a = tiny_models("llama")
    b = tiny("llama", num_hidden_layers=2)  # same widths, another depth
    unbound = fs.SteeringPlan().add(layer=1, site="layer.out", b=0.5 * torch.ones(64))
    with fs.attach(a, unbound, backend="torch"):
        assert unbound.spec is None
    with fs.attach(b, unbound, backend="torch"):  # was refused: "num_layers is 3 in the plan but 2"
        pass
    ids = rand_ids(a)
    plan = random_plan(a, ["layer.out"], seed=2)
    with fs.attach(a, plan, backend="torch"), torch.no_grad():
        before = a(ids).logits
        plan.entries[0].b.mul_(100)  # editing the caller's plan changes nothing until update()
        plan.add(layer=2, site="layer.out", b=torch.ones(64))
        assert torch.equal(a(ids).logits, before)
