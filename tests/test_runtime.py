"""Core runtime: `torch` backend vs the `reference` hooks on tiny models of every family."""

import zlib

import pytest
import torch
from conftest import FAMILIES, patched_forward, random_plan

import fusesteer as fs
from fusesteer.kernels._common import kernel_mode, triton_available
from fusesteer.runtime.families import model_parts
from fusesteer.testing import FP32_ABS, logit_tolerance

SITES = fs.SITES


def greedy_with_logits(model, ids, steps, attention_mask=None):
    """Prefill + `steps` cached greedy decode steps; returns (tokens [B, steps], logits list)."""
    with torch.no_grad():
        out = model.generate(ids, attention_mask=attention_mask, max_new_tokens=steps, do_sample=False,
                             output_logits=True, return_dict_in_generate=True, pad_token_id=0,
                             min_new_tokens=steps)
    return out.sequences[:, ids.shape[1]:], torch.stack(out.logits, 1)


def ids_for(model, batch=2, length=7, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(1, model.config.vocab_size, (batch, length), generator=g)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("site", SITES)
@pytest.mark.parametrize("sparse", [False, True], ids=["dense", "sparse"])
def test_torch_matches_reference_fp32(tiny_models, family, site, sparse):
    model = tiny_models(family)
    plan = random_plan(model, [site], sparse=sparse, seed=zlib.crc32(f"{family}/{site}/{sparse}".encode()) % 1000)
    ids = ids_for(model)
    res = {}
    for backend in ("reference", "torch"):
        with fs.attach(model, plan, backend=backend):
            with torch.no_grad():
                prefill = model(ids).logits
            toks, logits = greedy_with_logits(model, ids, 16)
        res[backend] = (prefill, toks, logits)
    with torch.no_grad():
        vanilla = model(ids).logits
    assert (res["reference"][0] - vanilla).abs().max() > 1e-3, "plan had no effect: test would be vacuous"
    assert (res["torch"][0] - res["reference"][0]).abs().max() <= FP32_ABS
    assert torch.equal(res["torch"][1], res["reference"][1])
    assert (res["torch"][2] - res["reference"][2]).abs().max() <= FP32_ABS


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_torch_matches_reference_half(tiny_models, family, dtype):
    model = tiny_models(family, dtype)
    plan = random_plan(model, SITES, seed=3, scale=0.3)
    ids = ids_for(model)
    out = {}
    for backend in ("reference", "torch"):
        with fs.attach(model, plan, backend=backend), torch.no_grad():
            out[backend] = model(ids).logits.float()
    ref = out["reference"]
    # bf16 has 8 mantissa bits; the two backends round at the same points, the residual differences
    # come from addcmul (fused) vs separate multiply/add in fp32 before the bf16 cast.
    tol = logit_tolerance("bf16", "torch", ref.abs().max().item())
    assert (out["torch"] - ref).abs().max().item() <= tol


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("backend", ["torch", "reference"])
def test_identity_and_empty_plans_are_bit_exact(tiny_models, family, backend):
    model = tiny_models(family)
    ids = ids_for(model)
    with torch.no_grad():
        vanilla = model(ids).logits
    empty = fs.SteeringPlan.for_model(model)
    ident = fs.SteeringPlan.for_model(model)
    parts = model_parts(model)
    for layer in range(ident.spec.num_layers):
        for site in parts.sites_of(layer):
            w = ident.spec.site_width(site)
            ident.add(layer=layer, site=site, a=torch.ones(w), b=torch.zeros(w))
    for plan in (empty, ident):
        with fs.attach(model, plan, backend=backend), torch.no_grad():
            assert torch.equal(model(ids).logits, vanilla)
    with torch.no_grad():
        assert torch.equal(model(ids).logits, vanilla)


@pytest.mark.parametrize("family", FAMILIES)
def test_detach_restores_forwards_exactly(tiny_models, family):
    model = tiny_models(family)
    plan = random_plan(model, SITES, seed=1)
    before = {n: dict(m.__dict__) for n, m in model.named_modules()}
    hooks = {n: (dict(m._forward_hooks), dict(m._forward_pre_hooks)) for n, m in model.named_modules()}
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    ids = ids_for(model)
    with torch.no_grad():
        vanilla = model(ids).logits
    backends = ["torch", "reference", "auto"] + (["triton"] if triton_available("cpu") else [])
    for backend in backends:
        with kernel_mode("triton" if backend == "triton" else "auto"):
            h = fs.attach(model, plan, backend=backend)
            with torch.no_grad():
                model(ids)
            h.detach()
            h.detach()  # idempotent
    for n, m in model.named_modules():
        assert patched_forward(m) is None, n
        assert set(m.__dict__) == set(before[n]), n
        # (transformers may have installed its own output-capturing hooks earlier: those must stay as they were)
        assert (dict(m._forward_hooks), dict(m._forward_pre_hooks)) == hooks[n], n
    for k, v in model.state_dict().items():
        assert torch.equal(v, sd[k]), k
    with torch.no_grad():
        assert torch.equal(model(ids).logits, vanilla)


def _row_alone(model, ids_row, plan, backend, steps, gating_plan=True):
    with fs.attach(model, plan, backend=backend):
        toks, logits = greedy_with_logits(model, ids_row[None], steps)
    return toks[0], logits[0]


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("backend", ["torch", "reference"])
def test_per_row_plans_and_gating_match_rows_alone(tiny_models, family, backend):
    model = tiny_models(family)
    calm = random_plan(model, ["layer.out", "mlp.down_proj.in"], seed=11, gating="prompt")
    bold = random_plan(model, ["attn.o_proj.in", "mlp.out"], sparse=True, seed=12, gating="generated")
    bold.extend(random_plan(model, ["layer.out"], seed=13, gating="all", scale=0.3))
    g = torch.Generator().manual_seed(5)
    lengths = [5, 8, 3]
    rows = [torch.randint(1, model.config.vocab_size, (n,), generator=g) for n in lengths]
    T = max(lengths)
    ids = torch.zeros(3, T, dtype=torch.long)
    mask = torch.zeros(3, T, dtype=torch.long)
    for i, r in enumerate(rows):  # left padding
        ids[i, T - len(r):] = r
        mask[i, T - len(r):] = 1
    steps = 8
    with fs.attach(model, {"calm": calm, "bold": bold}, backend=backend) as h:
        h.route(["calm", None, "bold"])
        toks, logits = greedy_with_logits(model, ids, steps, attention_mask=mask)
    expect = [calm, None, bold]
    for i, plan in enumerate(expect):
        if plan is None:
            t1, l1 = greedy_with_logits(model, rows[i][None], steps)
            t1, l1 = t1[0], l1[0]
        else:
            t1, l1 = _row_alone(model, rows[i], plan, backend, steps)
        assert torch.equal(toks[i], t1), f"row {i}"
        assert (logits[i] - l1).abs().max() <= FP32_ABS, f"row {i}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("gating", ["all", "generated"])
def test_per_row_additive_and_untouched_sites_equal_the_reference(tiny_models, dtype, gating):
    """Several plans in one batch, where the host knows more than the device tables say: sites no routed plan
    acts at are skipped, sites where every routed plan is additive run one add. Bit for bit the reference's
    (which maps every token by itself), phase-free and gated, fp32 and bf16; a gains plan routed next to them
    turns the generic path back on."""
    model = tiny_models("llama", dtype)
    h_ = model.config.hidden_size
    g = torch.Generator().manual_seed(9)
    one = fs.SteeringPlan.for_model(model).add(layer=1, site="layer.out", b=torch.randn(h_, generator=g),
                                               gating=gating)
    two = fs.SteeringPlan.for_model(model).add(layer=1, site="layer.out", b=torch.randn(h_, generator=g))
    two.add(layer=0, site="mlp.out", b=torch.randn(h_, generator=g), gating=gating)
    gains = random_plan(model, ["layer.out"], seed=4)
    ids = ids_for(model, batch=3)
    out = {}
    for backend in ("reference", "torch"):
        with fs.attach(model, {"one": one, "two": two, "gains": gains}, backend=backend) as h:
            for route in (["one", None, "two"], ["two", "one", "gains"]):
                h.route(route)
                out[backend, tuple(route)] = greedy_with_logits(model, ids, 4)
    for route in (("one", None, "two"), ("two", "one", "gains")):
        ref, got = out["reference", route], out["torch", route]
        assert torch.equal(got[0], ref[0]) and torch.equal(got[1], ref[1]), route
    with torch.no_grad():
        van = greedy_with_logits(model, ids, 4)
    assert not torch.equal(out["torch", ("one", None, "two")][1][0], van[1][0])  # not vacuous
    assert torch.equal(out["torch", ("one", None, "two")][1][1], van[1][1])  # the unsteered row


def test_gating_prompt_vs_generated_differ(tiny_models):
    model = tiny_models("llama")
    ids = ids_for(model, batch=1)
    outs = {}
    for gating in ("all", "prompt", "generated"):
        plan = random_plan(model, ["layer.out"], seed=2, gating=gating, scale=2.0)
        with fs.attach(model, plan, backend="torch"):
            with torch.no_grad():
                outs[gating + "_prefill"] = model(ids).logits
            outs[gating] = greedy_with_logits(model, ids, 6)[1]
    with torch.no_grad():
        vanilla = model(ids).logits
    # prefill tokens are prompt tokens: "generated" gating leaves them alone, "prompt" steers them
    assert torch.equal(outs["generated_prefill"], vanilla)
    assert torch.allclose(outs["prompt_prefill"], outs["all_prefill"])
    # after prefill, "prompt" and "all" diverge (decode tokens are generated)
    assert (outs["prompt"][:, 1:] - outs["all"][:, 1:]).abs().max() > 1e-4


def test_identity_row_bit_identical_in_mixed_batch(tiny_models):
    model = tiny_models("qwen3")
    plan = random_plan(model, SITES, seed=4)
    ids = ids_for(model, batch=3)
    with torch.no_grad():
        vanilla = model(ids).logits
    with fs.attach(model, {"p": plan}, backend="torch") as h:
        h.route([None, "p", None])
        with torch.no_grad():
            out = model(ids).logits
    assert torch.equal(out[0], vanilla[0]) and torch.equal(out[2], vanilla[2])
    assert not torch.allclose(out[1], vanilla[1])


def test_update_values_in_place(tiny_models):
    model = tiny_models("llama")
    p1 = random_plan(model, ["layer.out"], seed=1)
    p2 = random_plan(model, ["layer.out"], seed=2)
    ids = ids_for(model)
    with fs.attach(model, p2, backend="torch"), torch.no_grad():
        want = model(ids).logits
    with fs.attach(model, p1, backend="torch") as h, torch.no_grad():
        h.update(p2)
        got = model(ids).logits
    assert torch.equal(got, want)


def test_nesting_raises_clear_error(tiny_models):
    model = tiny_models("llama")
    p = random_plan(model, ["layer.out"], seed=1)
    with fs.attach(model, p, backend="torch"):
        with pytest.raises(fs.AttachError, match="already has a fusesteer plan attached"):
            fs.attach(model, p, backend="reference")


def test_routing_errors(tiny_models):
    model = tiny_models("llama")
    p = random_plan(model, ["layer.out"], seed=1)
    ids = ids_for(model, batch=2)
    with fs.attach(model, {"a": p, "b": p}, backend="torch") as h:
        with pytest.raises(fs.AttachError, match="call handle.route"):
            model(ids)
        with pytest.raises(fs.AttachError, match="unknown plan 'c'"):
            h.route(["a", "c"])
        h.route(["a", "b", None])
        with pytest.raises(fs.AttachError, match="routing has 3 rows but the batch has 2"):
            model(ids)


def test_non_finite_guard(tiny_models):
    model = tiny_models("llama")
    plan = fs.SteeringPlan.for_model(model)
    plan.add(layer=0, site="layer.out", a=3.4e38, b=torch.full((plan.spec.hidden_size,), 3.4e38))
    ids = ids_for(model)
    for backend in ("torch", "reference"):
        with fs.attach(model, plan, backend=backend):
            with pytest.raises(fs.NonFiniteActivationError, match="layer 0, site 'layer.out'"):
                model(ids)
        with fs.attach(model, plan, backend=backend, check_finite=False), torch.no_grad():
            model(ids)


@pytest.fixture(scope="module")
def tiny_8bit(tmp_path_factory):
    pytest.importorskip("bitsandbytes")
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from fusesteer.testing import tiny

    out = {}
    for family in ("llama", "gemma3"):
        path = tmp_path_factory.mktemp(f"tiny8_{family}")
        # bitsandbytes' CPU 4-bit path needs widths divisible by its block size (64)
        tiny(family, seed=0, intermediate_size=128).save_pretrained(path)
        for bits in ("8bit", "4bit"):
            q = (BitsAndBytesConfig(load_in_8bit=True) if bits == "8bit" else
                 BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_compute_dtype=torch.float32))
            out[family, bits] = AutoModelForCausalLM.from_pretrained(path, quantization_config=q,
                                                                     dtype=torch.float32).eval()
    return out


@pytest.mark.parametrize("family", ["llama", "gemma3"])
@pytest.mark.parametrize("bits", ["8bit", "4bit"])
def test_bitsandbytes_torch_matches_reference(tiny_8bit, family, bits):
    model = tiny_8bit[family, bits]
    assert ("Linear8bitLt" if bits == "8bit" else "Linear4bit") in type(model.model.layers[0].mlp.down_proj).__name__
    plan = random_plan(model, SITES, seed=21, scale=0.3)
    ids = ids_for(model)
    res = {}
    for backend in ("reference", "torch"):
        with fs.attach(model, plan, backend=backend):
            res[backend] = greedy_with_logits(model, ids, 8)
    with torch.no_grad():
        vanilla = model(ids).logits
    assert torch.equal(res["torch"][0], res["reference"][0])
    assert (res["torch"][1] - res["reference"][1]).abs().max() <= FP32_ABS
    with torch.no_grad():
        assert torch.equal(model(ids).logits, vanilla)


def test_attach_arguments_are_checked(tiny_models):
    model = tiny_models("llama")
    p = random_plan(model, ["layer.out"], seed=1)
    for bad in (5, "some", {"a": 1}, 2.5):
        with pytest.raises(fs.AttachError, match=r"sites: expected 'all' or a list of \(layer, site\) pairs"):
            fs.attach(model, p, sites=bad)
    for cap in (2 ** 40, 2 ** 16 + 1, 0, True, 1.5):
        with pytest.raises(fs.AttachError, match=r"capacity=.*expected an integer from the number of plans \(1\) "
                                                 r"to 65536"):
            fs.attach(model, {"a": p}, capacity=cap)
    assert not hasattr(model, "_fusesteer_handle")


def test_plan_tables_that_cannot_be_allocated_are_an_attach_error(tiny_models, monkeypatch):
    from fusesteer.runtime import tables

    model = tiny_models("llama")
    p = random_plan(model, ["layer.out"], seed=1)

    def no_memory(*a, **k):
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:127] DefaultCPUAllocator: can't allocate memory")
    monkeypatch.setattr(tables, "host_tables", no_memory)
    with pytest.raises(fs.AttachError, match=r"capacity=3: the plan tables for .* could not be allocated"):
        fs.attach(model, {"a": p}, capacity=3)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_unsteered_rows_per_backend(tiny_models, dtype):
    """What the README promises for an unsteered row in a batch with steered ones: bit-identical on reference and
    torch; on triton (fused add + RMSNorm kernels, which sum in another order than HF's norm) within the
    Triton logit tolerance of fusesteer.testing, and not bit-identical."""
    from fusesteer.testing import logit_tolerance

    model = tiny_models("llama", dtype)
    plan = random_plan(model, SITES, seed=4)
    ids = ids_for(model, batch=3)
    with torch.no_grad():
        vanilla = model(ids).logits
    for backend in ("reference", "torch", "triton"):
        with fs.attach(model, {"p": plan}, backend=backend) as h:
            h.route([None, "p", None])
            with torch.no_grad():
                out = model(ids).logits
        rows = out[[0, 2]].float()
        want = vanilla[[0, 2]].float()
        if backend != "triton":
            assert torch.equal(rows, want), backend
        else:
            tol = logit_tolerance("fp32" if dtype == torch.float32 else "bf16", "triton", want.abs().max().item())
            assert (rows - want).abs().max().item() <= tol
