"""`triton` backend (kernels run through the Triton interpreter on CPU) vs the `reference` hooks."""

import pytest  # noqa: E402
import torch  # noqa: E402
from conftest import FAMILIES, random_plan  # noqa: E402

import fusesteer as fs  # noqa: E402
from fusesteer.kernels._common import kernel_mode, triton_available  # noqa: E402
from fusesteer.testing import FP32_ABS, logit_tolerance  # noqa: E402

pytestmark = pytest.mark.skipif(not triton_available("cpu"), reason="triton not installed")


def _greedy(model, ids, steps, mask=None):
    with torch.no_grad():
        out = model.generate(ids, attention_mask=mask, max_new_tokens=steps, min_new_tokens=steps,
                             do_sample=False, output_logits=True, return_dict_in_generate=True, pad_token_id=0)
    return out.sequences[:, ids.shape[1]:], torch.stack(out.logits, 1)


@pytest.mark.parametrize("family", FAMILIES)
def test_triton_matches_reference_with_cached_decode(tiny_models, family):
    model = tiny_models(family)
    plan = random_plan(model, fs.SITES, seed=7)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1, model.config.vocab_size, (2, 6), generator=g)
    res = {}
    for backend in ("reference", "triton"):
        with kernel_mode("triton" if backend == "triton" else "auto"), fs.attach(model, plan, backend=backend):
            with torch.no_grad():
                pre = model(ids).logits
            toks, logits = _greedy(model, ids, 8)
        res[backend] = (pre, toks, logits)
    assert (res["triton"][0] - res["reference"][0]).abs().max() <= FP32_ABS
    assert torch.equal(res["triton"][1], res["reference"][1])
    assert (res["triton"][2] - res["reference"][2]).abs().max() <= FP32_ABS


@pytest.mark.parametrize("family", FAMILIES)
def test_triton_per_row_plans_and_gating(tiny_models, family):
    model = tiny_models(family)
    calm = random_plan(model, ["layer.out", "mlp.down_proj.in"], seed=11, gating="prompt")
    bold = random_plan(model, ["attn.o_proj.in", "mlp.out"], sparse=True, seed=12, gating="generated")
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(1, model.config.vocab_size, (3, 5), generator=g)
    mask = torch.ones_like(ids)
    mask[2, :2] = 0  # left padding on the last row
    res = {}
    for backend in ("reference", "triton"):
        with kernel_mode("triton" if backend == "triton" else "auto"), \
                fs.attach(model, {"calm": calm, "bold": bold}, backend=backend) as h:
            h.route(["calm", None, "bold"])
            res[backend] = _greedy(model, ids, 6, mask)
    assert torch.equal(res["triton"][0], res["reference"][0])
    assert (res["triton"][1] - res["reference"][1]).abs().max() <= FP32_ABS


@pytest.mark.parametrize("family", FAMILIES)
def test_triton_bf16_within_tolerance(tiny_models, family):
    """bf16: the fused kernels round once per fused op where HF rounds after every step (the tolerance's triton
    rule). On Qwen3-MoE the router must see HF's own norm: an ulp there can flip an expert."""
    model = tiny_models(family, torch.bfloat16)
    plan = random_plan(model, [s for s in fs.SITES if any(s in have for have in fs.model_sites(model).values())],
                       seed=5, scale=0.3)
    ids = torch.randint(1, model.config.vocab_size, (2, 5), generator=torch.Generator().manual_seed(0))
    out = {}
    for backend in ("reference", "triton"):
        with kernel_mode("triton" if backend == "triton" else "auto"), fs.attach(model, plan, backend=backend):
            with torch.no_grad():
                out[backend] = model(ids).logits.float()
    ref = out["reference"]
    # the fused kernels round once per op in bf16 where HF rounds after every step
    assert (out["triton"] - ref).abs().max().item() <= logit_tolerance("bf16", "triton", ref.abs().max().item())


def test_triton_empty_plan_leaves_model_bit_exact(tiny_models):
    model = tiny_models("gemma2")
    ids = torch.randint(1, model.config.vocab_size, (1, 5), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        v = model(ids).logits
        with kernel_mode("triton"), fs.attach(model, fs.SteeringPlan.for_model(model), backend="triton"):
            assert torch.equal(model(ids).logits, v)
        assert torch.equal(model(ids).logits, v)


def test_triton_identity_row_matches_fused_unsteered(tiny_models):
    """An identity row in a mixed batch equals the fused path with no map (kernel-level identity)."""
    model = tiny_models("llama")
    plan = random_plan(model, fs.SITES, seed=2)
    ident = fs.SteeringPlan.for_model(model)
    ident.add(layer=0, site="layer.out", a=1.0)  # touches a site so the fused path is used, but is identity
    ids = torch.randint(1, model.config.vocab_size, (2, 5), generator=torch.Generator().manual_seed(0))
    with torch.no_grad(), kernel_mode("triton"):
        with fs.attach(model, {"p": plan, "i": ident}, backend="triton") as h:
            h.route([None, "p"])
            mixed = model(ids).logits
        with fs.attach(model, ident, backend="triton"):
            alone = model(ids).logits
        vanilla = model(ids).logits
    assert torch.equal(mixed[0], alone[0])
    assert (mixed[0] - vanilla[0]).abs().max() <= FP32_ABS
