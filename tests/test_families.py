"""What differs between families: the support matrix (generated from the backends' declarations, in the CLI and
the README), fold's refusals where a family's layout keeps a site from folding, Qwen3-MoE's sparse layers (no
single down_proj; AUSteer localizes around them), plan files bound to the model type, the generic reference-hooks
path on an architecture without an adapter (Cohere) and an unsupported layout refused.

The parity of every backend on every family (prefill and cached decode, per-row plans and gating, bf16, fold,
bit-exact detach) is in the subject files, parametrized over the same family list (tests/conftest.py FAMILIES):
test_runtime.py, test_triton_backend.py, test_fold.py, test_routing.py, test_contract.py.
"""

from __future__ import annotations

import logging

import pytest
import torch
from conftest import FAMILIES, patched_forward

import fusesteer as fs
from fusesteer.kernels._common import kernel_mode, triton_available
from fusesteer.testing import FP32_ABS, tiny

TOL = FP32_ABS  # fp32 logits, every backend vs the reference hooks (fusesteer.testing)
needs_triton = pytest.mark.skipif(not triton_available("cpu"), reason="triton not installed")


@pytest.fixture(scope="module")
def models():
    cache = {}

    def get(family):
        if family not in cache:
            cache[family] = tiny(family)
        return cache[family]
    return get


def full_plan(model, seed=7, scale=0.5, gating="all", sites=None, sparse=False):
    """Random (a, b) at every site every layer has (``sites``: a subset)."""
    g = torch.Generator().manual_seed(seed)
    plan = fs.SteeringPlan.for_model(model)
    for layer, have in fs.model_sites(model).items():
        for site in have:
            if sites is not None and site not in sites:
                continue
            w = plan.spec.site_width(site)
            dims = torch.randperm(w, generator=g)[: max(1, w // 8)] if sparse else None
            n = w if dims is None else dims.numel()
            plan.add(layer=layer, site=site, a=1 + scale * (torch.rand(n, generator=g) - 0.5),
                     b=scale * torch.randn(n, generator=g), dims=dims, gating=gating)
    return plan


def ids_for(model, batch=2, length=6, seed=1):
    return torch.randint(3, model.config.vocab_size, (batch, length), generator=torch.Generator().manual_seed(seed))


def greedy(model, ids, steps, mask=None):
    with torch.no_grad():
        out = model.generate(ids, attention_mask=mask, max_new_tokens=steps, min_new_tokens=steps, do_sample=False,
                             output_logits=True, return_dict_in_generate=True, pad_token_id=0)
    return out.sequences[:, ids.shape[1]:], torch.stack(out.logits, 1)


def run(model, plans, backend, fn, route=None):
    with kernel_mode("triton" if backend == "triton" else "auto"), fs.attach(model, plans, backend=backend) as h:
        if route is not None:
            h.route(route)
        return fn()


# --------------------------------------------------------------------------------------------------
# the adapters
# --------------------------------------------------------------------------------------------------
def test_supported_models_lists_every_family_and_the_generic_path():
    rows = fs.supported_models()
    names = [r["family"] for r in rows]
    for f in FAMILIES:
        assert f in names
    assert names[-1] == "generic"
    by = {r["family"]: r for r in rows}
    assert "MistralForCausalLM" in by["mistral"]["classes"] and by["olmo2"]["layout"] == "post"
    assert "refused" in by["olmo2"]["backends"]["fold"] and "sparse" in by["qwen3_moe"]["backends"]["fold"]
    assert by["generic"]["backends"]["triton"] == "refused"
    for r in rows:
        assert set(r["backends"]) == {"reference", "torch", "triton", "fold", "auto"}


# --------------------------------------------------------------------------------------------------
# fold
# --------------------------------------------------------------------------------------------------
def static_plan(model, seed=5):
    """What folds on a pre-norm dense layer: maps at both input sites, mlp.out, and an additive layer.out."""
    g = torch.Generator().manual_seed(seed)
    plan = fs.SteeringPlan.for_model(model)
    for layer, have in fs.model_sites(model).items():
        for site in have:
            w = plan.spec.site_width(site)
            a = None if site == "layer.out" else 1 + 0.4 * (torch.rand(w, generator=g) - 0.5)
            plan.add(layer=layer, site=site, a=a, b=0.3 * torch.randn(w, generator=g))
    return plan


def test_fold_refusals_name_the_reason(models):
    olmo = models("olmo2")
    plan = fs.SteeringPlan.for_model(olmo)
    plan.add(layer=1, site="layer.out", b=torch.ones(64))
    with pytest.raises(fs.AttachError, match="post_feedforward_layernorm"):
        fs.attach(olmo, plan, backend="fold")
    moe = models("qwen3_moe")
    for site in ("mlp.out", "layer.out"):
        plan = fs.SteeringPlan.for_model(moe)
        plan.add(layer=0, site=site, b=torch.ones(64))
        with pytest.raises(fs.AttachError, match="sparse MoE layer"):
            fs.attach(moe, plan, backend="fold")
    # the dense layer of the MoE model folds, and auto folds what folds and runs the rest fused
    plan = static_plan(moe)
    ids = ids_for(moe)
    ref = run(moe, plan, "reference", lambda: moe(ids).logits)
    with fs.attach(moe, plan, backend="auto") as h:
        folded = {tuple(k) for k in h.report["folded"]}
        with torch.no_grad():
            got = moe(ids).logits
    assert {k[0] for k in folded} >= {1} and all(k[0] == 1 or k[1] == "attn.o_proj.in" for k in folded)
    assert (got - ref).abs().max() <= TOL


# --------------------------------------------------------------------------------------------------
# Qwen3-MoE sites, AUSteer on it
# --------------------------------------------------------------------------------------------------
def test_moe_down_proj_on_a_sparse_layer_is_a_plan_error(models):
    moe = models("qwen3_moe")
    assert fs.model_sites(moe)[0] == ("layer.out", "attn.o_proj.in", "mlp.out")
    assert "mlp.down_proj.in" in fs.model_sites(moe)[1]  # the dense layer keeps it
    plan = fs.SteeringPlan.for_model(moe)
    plan.add(layer=0, site="mlp.down_proj.in", b=torch.ones(plan.spec.intermediate_size))
    for backend in ("reference", "torch", "fold", "auto"):
        with pytest.raises(fs.PlanError, match=r"sparse MoE layer.*mlp\.down_proj\.in.*dense layers.*mlp\.out"):
            fs.attach(moe, plan, backend=backend)
    with pytest.raises(fs.AttachError, match="sparse MoE"):
        fs.attach(moe, fs.SteeringPlan.for_model(moe), backend="torch", sites=[(2, "mlp.down_proj.in")])
    with fs.attach(moe, fs.SteeringPlan.for_model(moe), backend="torch", sites="all") as h:  # skips what is absent
        assert (0, "mlp.down_proj.in") not in h.keys and (1, "mlp.down_proj.in") in h.keys


def test_austeer_localizes_on_qwen3_moe(models):
    from tokenizers import Tokenizer, pre_tokenizers
    from tokenizers import models as tok_models
    from transformers import PreTrainedTokenizerFast

    from fusesteer.methods import austeer as A
    from fusesteer.methods.pairs import ContrastivePair

    words = ["<pad>", "<s>", "</s>", "<unk>"] + [f"w{i}" for i in range(60)]
    tk = Tokenizer(tok_models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                                  unk_token="<unk>")
    g = torch.Generator().manual_seed(0)

    def text(n):
        return " ".join(f"w{int(i)}" for i in torch.randint(0, 60, (n,), generator=g))
    pairs = [ContrastivePair(id=f"p{i}", prompt=text(5), positive=text(2), negative=text(2)) for i in range(10)]
    moe = models("qwen3_moe")
    locs = A.localize_many(moe, tok, pairs, ["attn.o_proj.in", "mlp.out"], batch_size=4)
    for site, loc in locs.items():
        assert loc.n_pairs == 10 and loc.spec.model_type == "qwen3_moe"
        plan = A.build_plan(loc, k=4, alpha=2.0)
        assert 1 <= len(plan.entries) <= 4
        ids = ids_for(moe)
        ref = run(moe, plan, "reference", lambda: moe(ids).logits)
        got = run(moe, plan, "torch", lambda: moe(ids).logits)
        assert (got - ref).abs().max() <= TOL
    with pytest.raises(fs.PlanError, match="sparse MoE layer"):
        A.localize(moe, tok, pairs, "down")
    assert A.localize(moe, tok, pairs, "down", layers=[1]).n_pairs == 10


# --------------------------------------------------------------------------------------------------
# plan files, the generic path
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", FAMILIES)
def test_plan_files_are_bound_to_the_model_type(models, family, tmp_path):
    model = models(family)
    plan = full_plan(model, seed=2)
    path = tmp_path / "plan.safetensors"
    plan.save(path)
    back = fs.SteeringPlan.load(path)
    assert back.spec.model_type == model.config.model_type
    ids = ids_for(model)
    a = run(model, plan, "torch", lambda: model(ids).logits)
    b = run(model, back, "torch", lambda: model(ids).logits)
    assert torch.equal(a, b)
    other = models("mistral" if family != "mistral" else "gemma")
    with pytest.raises(fs.PlanError, match="another model"):
        fs.attach(other, back, backend="torch")


def test_generic_reference_path_on_an_architecture_without_adapter(caplog):
    model = tiny("cohere")
    plan = fs.SteeringPlan.for_model(model)
    g = torch.Generator().manual_seed(4)
    for site in fs.SITES:
        plan.add(layer=1, site=site, b=0.5 * torch.randn(plan.spec.site_width(site), generator=g))
    ids = ids_for(model)
    with torch.no_grad():
        van = model(ids).logits
    with caplog.at_level(logging.WARNING, logger="fusesteer"):
        with fs.attach(model, plan, backend="reference"):
            with torch.no_grad():
                got = model(ids).logits
    warn = " ".join(r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)
    assert "CohereForCausalLM" in warn and "no family adapter" in warn and "unverified" in warn
    assert (got - van).abs().max() > 0.05
    # the reference hooks do what a plain hook at the HF module would do
    layer = model.model.layers[1]
    b = plan.entries[[e.site for e in plan.entries].index("mlp.out")].b

    def post(m, args, out):
        return out + b
    hk = layer.mlp.register_forward_hook(post)
    try:
        only = fs.SteeringPlan.for_model(model)
        only.add(layer=1, site="mlp.out", b=b)
        with torch.no_grad():
            want = model(ids).logits
        with fs.attach(model, only, backend="reference"):
            with torch.no_grad():
                double = model(ids).logits
    finally:
        hk.remove()
    with torch.no_grad(), fs.attach(model, only, backend="reference"):
        assert torch.equal(model(ids).logits, want)
    assert not torch.equal(double, want)
    for backend in ("torch", "triton", "fold"):
        with pytest.raises(fs.AttachError, match=r"needs a family adapter.*CohereForCausalLM.*backend='reference'"):
            fs.attach(model, plan, backend=backend)
    with fs.attach(model, plan, backend="auto"):  # auto takes the only backend there is
        with torch.no_grad():
            assert torch.equal(model(ids).logits, got)
    with torch.no_grad():
        assert torch.equal(model(ids).logits, van)
    assert all(patched_forward(m) is None and not m._forward_hooks for m in model.modules())
    assert not [k for k in model.__dict__ if "fusesteer" in k]  # nothing left on the model


def test_unsupported_layout_is_refused_with_what_is_missing():
    import transformers as tf

    cfg = tf.GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64)
    model = tf.GPT2LMHeadModel(cfg)
    with pytest.raises(fs.AttachError, match=r"GPT2LMHeadModel.*model\.model\.layers.*adapters for"):
        fs.attach(model, fs.SteeringPlan(fs.ModelSpec("gpt2", 1, 32, 128, 32)), backend="reference")
    with pytest.raises(fs.AttachError, match="model_type='gpt2'"):
        fs.model_sites(model)


def test_cli_supported_prints_the_matrix(capsys):
    import json

    from fusesteer import cli

    assert cli.main(["supported"]) == 0
    text = capsys.readouterr().out
    assert "qwen3_moe" in text and "Olmo2ForCausalLM" in text and "generic" in text
    assert cli.main(["supported", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert rows == json.loads(json.dumps(fs.supported_models()))


def test_bench_families_are_the_tiny_families():
    from fusesteer.bench import options
    from fusesteer.testing import TINY_FAMILIES

    assert options.FAMILIES == TINY_FAMILIES


def test_readme_support_matrix_is_the_backends_declarations():
    """The README's matrix is generated from Backend.support(family): regenerate it with
    `fusesteer supported --markdown` when a backend or a family changes."""
    from pathlib import Path

    from fusesteer.runtime.support import support_markdown

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    assert support_markdown() in readme
