"""Reliability, second pass: one test per defect a hostile pass found (lifecycle, moves, carried norms, foreign
forwards, the non-finite guard, plan files that must not be written, raw tracebacks, API papercuts)."""

import json
import os
import struct

import numpy as np
import pytest
import torch
from conftest import patched_forward, random_plan

import fusesteer as fs
from fusesteer.cli import main

SPEC = fs.ModelSpec("llama", num_layers=4, hidden_size=8, intermediate_size=12, attn_width=8)


def _ids(model, batch=2, seq=6, seed=0):
    return torch.randint(1, model.config.vocab_size, (batch, seq), generator=torch.Generator().manual_seed(seed))


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
# 1. a detached handle refuses every call and never touches the model
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", ["auto", "fold", "torch", "reference", "triton"])
def test_detached_handle_refuses_every_call(tiny_models, backend):
    model = tiny_models("llama")
    ids = _ids(model)
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
# 2. moving an attached model is refused before anything moves; detach restores exactly
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", ["fold", "auto", "torch", "reference"])
def test_moving_an_attached_model_is_refused(backend):
    from fusesteer.testing import tiny

    model = tiny("qwen2")  # private: it is moved at the end (non-persistent buffers would not come back)
    ids = _ids(model)
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
    ids = _ids(model)
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
# 3. triton: a stale carried norm is never used
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["no_grad", "inference_mode"])
@pytest.mark.parametrize("edit", ["layer output in place", "norm hook"])
def test_triton_carry_is_not_used_when_something_else_ran(tiny_models, mode, edit):
    """Between two layers another library's hook, added after attach, edits the layer's output in place
    (under inference mode the tensor has no version counter) or sits on the next layer's input norm (which the
    carry would skip): the carried rmsnorm(s) must not be used."""
    model = tiny_models("llama")
    ids = _ids(model)
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
# 4. an instance-level forward (or hooks) put there by another library
# ------------------------------------------------------------------------------------------------
def test_foreign_forward_is_kept_by_torch_and_refused_by_triton(tiny_models):
    model = tiny_models("llama")
    ids = _ids(model)
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
# 5. the non-finite guard: every update, the first forward of each phase, rejected values rolled back
# ------------------------------------------------------------------------------------------------
def _plan_b(model, value, gating="all", layer=0):
    return fs.SteeringPlan.for_model(model).add(layer=layer, site="layer.out", b=torch.full((64,), value),
                                                gating=gating)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # the Triton interpreter's numpy overflow warning
@pytest.mark.parametrize("backend", ["torch", "reference", "auto", "triton"])
def test_rejected_update_leaves_the_old_values(tiny_models, backend):
    model = tiny_models("llama", torch.float16)
    ids = _ids(model, batch=1, seq=4)
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
    ids = _ids(model, batch=1, seq=4)
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
# 6. plans that would not load again are never written
# ------------------------------------------------------------------------------------------------
def _small_plan():
    return fs.SteeringPlan.for_spec(SPEC, name="p").add(layer=1, site="layer.out", b=torch.arange(8.0))


@pytest.mark.parametrize("scale", [float("nan"), float("inf"), 1e39, True, "2"])
def test_scaled_refuses_bad_scales(scale):
    with pytest.raises(fs.PlanError, match="scale|float32 range"):
        _small_plan().scaled(scale)
    assert _small_plan().scaled(np.float32(0.5)).entries[0].b[2] == 1.0


@pytest.mark.parametrize("edit, match", [
    (lambda p: setattr(p, "name", 5), "plan.name must be a string or None, got int"),
    (lambda p: setattr(p, "notes", b"x"), "plan.notes must be a string"),
    (lambda p: p.metadata.update(k=np.float32(1.5)), r"plan.metadata\['k'\]: numpy.float32 .*convert it"),
    (lambda p: p.metadata.update(k={"deep": [1, np.int64(2)]}), r"plan.metadata\['k'\]\['deep'\]\[1\]"),
    (lambda p: p.metadata.update(k=float("nan")), "not a finite number"),
    (lambda p: p.metadata.update({3: "x"}), "keys must be strings"),
    (lambda p: p.metadata.update(k=object()), "is not a JSON value"),
    (lambda p: setattr(p.entries[0], "b", np.ones(8, dtype=np.float32)), "b must be a torch.float32 CPU tensor"),
    (lambda p: setattr(p.entries[0], "b", torch.ones(8, dtype=torch.float64)), "b must be a torch.float32"),
    (lambda p: setattr(p.entries[0], "b", torch.full((8,), float("inf"))), "NaN or Inf"),
    (lambda p: setattr(p.entries[0], "layer", 9), "layer 9 is out of range"),
])
def test_save_refuses_what_would_not_load(tmp_path, edit, match):
    p = _small_plan()
    edit(p)
    with pytest.raises(fs.PlanError, match=match):
        p.save(tmp_path / "p.safetensors")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("scale", ["nan", "1e39", "inf"])
def test_cli_convert_refuses_a_bad_scale(tmp_path, capsys, scale):
    src = tmp_path / "p.safetensors"
    _small_plan().save(src)
    assert main(["plan", "convert", str(src), str(tmp_path / "o.safetensors"), "--scale", scale]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("fusesteer: error: ")
    assert sorted(os.listdir(tmp_path)) == ["p.safetensors"]


# ------------------------------------------------------------------------------------------------
# 7. clean errors instead of raw tracebacks
# ------------------------------------------------------------------------------------------------
def _reseal(path, fn):
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    st = json.loads(raw[8:8 + n])
    meta = json.loads(st["__metadata__"]["fusesteer"])
    fn(meta)
    from fusesteer.runtime.planfile import plan_checksum

    meta["checksum"] = plan_checksum(meta, {})
    st["__metadata__"]["fusesteer"] = json.dumps(meta)
    h = json.dumps(st).encode()
    h += b" " * (-len(h) % 8)
    path.write_bytes(struct.pack("<Q", len(h)) + h + raw[8 + n:])


@pytest.mark.parametrize("value", [10**400, -10**400, 10**39, 1e39, 3.5e38])
def test_huge_scalars_in_a_resealed_plan_are_plan_errors(tmp_path, value):
    path = tmp_path / "s.safetensors"
    fs.SteeringPlan.for_spec(SPEC).add(layer=0, site="layer.out", a=2.0).save(path)
    _reseal(path, lambda m: m["entries"][0].update(a={"scalar": value}))
    with pytest.raises(fs.PlanError, match="a.scalar must be a finite number within the float32 range"):
        fs.SteeringPlan.load(path)


def test_bad_paths_are_plan_errors(tmp_path, capsys):
    from fusesteer.commands.plan import load_plan_file

    d = tmp_path / "x.safetensors"
    d.mkdir()
    for call in (lambda: fs.SteeringPlan.load(d), lambda: load_plan_file(str(d)),
                 lambda: fs.SteeringPlan.load(None), lambda: fs.SteeringPlan.load(""),
                 lambda: _small_plan().save(d), lambda: _small_plan().save(tmp_path / "missing" / "o.safetensors"),
                 lambda: _small_plan().save(None)):
        with pytest.raises(fs.PlanError):
            call()
    src = tmp_path / "p.safetensors"
    _small_plan().save(src)
    for argv in (["plan", "show", str(d)], ["plan", "show", str(d), "--json"],
                 ["plan", "convert", str(src), str(tmp_path / "missing" / "o.safetensors")],
                 ["plan", "convert", str(src), str(d)], ["plan", "convert", str(d), str(tmp_path / "o.gguf")],
                 ["plan", "convert", str(src), str(tmp_path / "missing" / "o.gguf")]):
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith("fusesteer: error: "), (argv, err)
    assert sorted(os.listdir(tmp_path)) == ["p.safetensors", "x.safetensors"]  # no .tmp left anywhere
    assert os.listdir(d) == []


# ------------------------------------------------------------------------------------------------
# 8. API papercuts
# ------------------------------------------------------------------------------------------------
def test_extend_is_atomic_and_self_extend_doubles_once(monkeypatch):
    p = _small_plan()
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
    ids = _ids(model)
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
    ids = _ids(a)
    plan = random_plan(a, ["layer.out"], seed=2)
    with fs.attach(a, plan, backend="torch"), torch.no_grad():
        before = a(ids).logits
        plan.entries[0].b.mul_(100)  # editing the caller's plan changes nothing until update()
        plan.add(layer=2, site="layer.out", b=torch.ones(64))
        assert torch.equal(a(ids).logits, before)


def test_gguf_direction_names_are_matched_whole(tmp_path):
    import gguf

    from fusesteer.interop import ControlVectorError, read_control_vector

    for name in ("direction.1\n", "direction.1 ", " direction.1", "direction.١"):
        path = tmp_path / "cv.gguf"
        w = gguf.GGUFWriter(str(path), "controlvector")
        w.add_string("controlvector.model_hint", "llama")
        w.add_uint32("controlvector.layer_count", 1)
        w.add_tensor(name, np.ones(8, dtype=np.float32))
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        with pytest.raises(ControlVectorError, match="is not named 'direction.<layer>'"):
            read_control_vector(path, SPEC)


def test_plan_show_escapes_untrusted_text_and_json_is_strict(tmp_path, capsys):
    evil = "\x1b[2J\x1b]0;owned\x07\u202e"
    spec = fs.ModelSpec("llama\x1b[31m", num_layers=4, hidden_size=8, intermediate_size=12, attn_width=8)
    p = fs.SteeringPlan.for_spec(spec, name="n" + evil, notes="line1\nline2" + evil,
                                 metadata={"k" + evil: "v" + evil, "nested": {evil: [evil]}})
    p.add(layer=1, site="layer.out", b=torch.full((8,), 3.0e38))  # norm overflows float32
    p.add(layer=2, site="attn.o_proj.in", a=torch.full((8,), 3.0e38))
    path = tmp_path / "evil.safetensors"
    p.save(path)
    assert main(["plan", "show", str(path)]) == 0
    out = capsys.readouterr().out
    assert not any(c in out for c in ("\x1b", "\x07", "\u202e")), out
    assert "\\x1b[2J" in out and "line1\\nline2" in out
    assert main(["plan", "show", str(path), "--json"]) == 0
    out = capsys.readouterr().out
    assert "\x1b" not in out

    def strict(name):
        raise ValueError(f"non-finite constant {name} in --json output")
    s = json.loads(out, parse_constant=strict)
    assert s["entries"][0]["b_norm"] == pytest.approx(3.0e38 * 8 ** 0.5, rel=1e-6)


# ------------------------------------------------------------------------------------------------
# 4b. forward hooks of another library that edit a steered layer's (or MLP's) output
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("where", ["layer", "mlp"])
def test_foreign_output_hooks_see_the_steered_output_on_every_backend(tiny_models, where):
    """An output site is its module's output: on every backend the map runs before the module's forward hooks
    (transformers' own output capture, another library's edit), so a hook that edits a steered layer's output
    edits the steered output everywhere. The contract probe on the hooked layer (layer 0, the first of its
    class) passes instead of blaming transformers."""
    from fusesteer.runtime import contract

    model = tiny_models("llama")
    ids = _ids(model)
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
    ids = _ids(model)
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
